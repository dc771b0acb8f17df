"""HTTP on loopback: Prometheus `/metrics`, `/healthz`, `/readyz`, and a small TF-Serving-shaped model API.

Every error is a JSON body with a 4xx/5xx status, never a traceback; request bodies are size-limited."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from prometheus_client.exposition import choose_encoder

from daemon.config import Config, ConfigError
from daemon.extractor import Extractor
from daemon.images import ImageRejected
from daemon.metrics import Metrics
from daemon.registry import ModelVersion
from daemon.serving import ServingModel

log = logging.getLogger(__name__)

MODEL_NAME = "retraind"
#: The most images one classify request may carry (each is decoded to the backbone's input size in memory).
MAX_INSTANCES = 128
_DISCARD_BYTES = 1 << 20
_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<rest>/metadata|:classify|:retrain)?$")


class ApiError(Exception):
    """A request the API refuses: sent as `{"error": message}` with `status` (and any extra headers)."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class Api:
    """What the handlers need from the daemon, gathered so the handler class stays stateless."""

    def __init__(
        self, config: Config, metrics: Metrics, serving: ServingModel, extractor: Extractor,
        retrain: Callable[[], ModelVersion | None], alive: Callable[[], bool],
    ) -> None:
        self.config, self.metrics, self.serving, self.extractor = config, metrics, serving, extractor
        self.retrain, self.alive = retrain, alive

    def status(self) -> dict[str, Any]:
        version = self.serving.version
        if version is None:
            return {"model_version_status": [{"version": "0", "state": "START",
                                              "status": {"error_code": "UNAVAILABLE",
                                                         "error_message": "no model trained yet"}}]}
        return {"model_version_status": [{"version": str(version.number), "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    def metadata(self) -> dict[str, Any]:
        version = self._version()
        m = version.metrics
        return {"model_spec": {"name": MODEL_NAME, "version": str(version.number)}, "labels": list(version.labels),
                "backbone": version.backbone, "accuracy": m.get("accuracy"),
                "per_class_accuracy": m.get("per_class_accuracy"), "manifest_sha256": m.get("manifest_sha256"),
                "images": m.get("images"), "created": m.get("created"), "trust": m.get("trust")}

    def classify(self, body: bytes, content_type: str) -> dict[str, Any]:
        version = self._version()
        images = [self._decode(data) for data in _payloads(body, content_type)]
        vectors = self.extractor.embed(np.stack(images), urgent=True)
        k = self.config.classify.top_k
        return {"model_version": version.number,
                "predictions": [{"top_k": [{"label": label, "score": score} for label, score in top]}
                                for top in self.serving.top_k(version, vectors, k)]}

    def _decode(self, data: bytes) -> np.ndarray:
        try:
            return self.extractor.decode(data)
        except ImageRejected as exc:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, f"not a usable image ({exc.reason}): {exc}") from exc

    def _version(self) -> Any:
        version = self.serving.version
        if version is None:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "no model trained yet")
        return version


def _payloads(body: bytes, content_type: str) -> list[bytes]:
    """Raw image bytes, or TF-Serving's `{"instances": [{"b64": ...}, ...]}` (recognised by its content type
    or by a leading `{`, which no image format starts with, so a forgotten header still works)."""
    if not body:
        raise ApiError(HTTPStatus.BAD_REQUEST, 'empty body: send image bytes or {"instances":[{"b64":...}]}')
    if not (content_type.startswith("application/json") or body.lstrip()[:1] == b"{"):
        return [body]
    try:
        instances = json.loads(body)["instances"]
        payloads = [base64.b64decode(item["b64"], validate=True) for item in instances]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f'expected {{"instances":[{{"b64":...}}]}}: {exc!r}') from exc
    if not 0 < len(payloads) <= MAX_INSTANCES:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"instances: send 1 to {MAX_INSTANCES} images, not {len(payloads)}")
    return payloads


class _Handler(BaseHTTPRequestHandler):
    api: Api
    server_version = "retraind"
    timeout = 30  # seconds a client may take to send its request; a stalled one gets 408, not a stuck thread

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (bad request line, unknown method, ...) as JSON too."""
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def _dispatch(self) -> None:
        try:
            handlers = self._resolve()
            method = "GET" if self.command == "HEAD" else self.command
            if method not in handlers:
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed here; use "
                               f"{' or '.join(handlers)}", {"Allow": ", ".join(handlers)})
            handlers[method]()
        except ApiError as exc:
            self._json(exc.status, {"error": str(exc)}, exc.headers)
        except Exception:
            log.exception("HTTP %s %s failed", self.command, self.path)
            self.api.metrics.internal_error("http_request")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the daemon's log"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _resolve(self) -> dict[str, Callable[[], None]]:
        """The handlers for this path, by method."""
        path = urlsplit(self.path).path
        fixed = {"/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz}
        if path in fixed:
            return {"GET": fixed[path]}
        match = _MODEL_PATH.match(path)
        if match is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        if match.group("name") != MODEL_NAME:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no model named {match.group('name')!r}; it is {MODEL_NAME!r}")
        serving = self.api.serving.version
        if match.group("version") and (serving is None or int(match.group("version")) != serving.number):
            current = f"version {serving.number} is" if serving else "none is yet"
            raise ApiError(HTTPStatus.NOT_FOUND, f"version {match.group('version')} is not served; {current}")
        routes: dict[str | None, dict[str, Callable[[], None]]] = {
            None: {"GET": lambda: self._json(HTTPStatus.OK, self.api.status())},
            "/metadata": {"GET": lambda: self._json(HTTPStatus.OK, self.api.metadata())},
            ":classify": {"POST": self._classify},
            ":retrain": {"POST": self._retrain},
        }
        return routes[match.group("rest")]

    def _metrics(self) -> None:
        encode, content_type = choose_encoder(self.headers.get("Accept", ""))  # OpenMetrics if asked for
        self._send(HTTPStatus.OK, encode(self.api.metrics.registry), content_type)

    def _healthz(self) -> None:
        alive = self.api.alive()
        self._json(HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE, {"alive": alive})

    def _readyz(self) -> None:
        version = self.api.serving.version
        status = HTTPStatus.OK if version else HTTPStatus.SERVICE_UNAVAILABLE
        self._json(status, {"ready": version is not None, "model_version": version.number if version else 0})

    def _classify(self) -> None:
        body = self._body()
        self._json(HTTPStatus.OK, self.api.classify(body, self.headers.get("Content-Type", "")))

    def _retrain(self) -> None:
        self._body(required=False)
        unchanged = self.api.retrain()  # the serving version when the training set has not changed since it
        if unchanged is not None:
            self._json(HTTPStatus.OK, {"retrain": "unchanged", "model_version": unchanged.number})
        else:
            self._json(HTTPStatus.ACCEPTED, {"retrain": "requested"})

    def _body(self, required: bool = True) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            if not required:
                return b""
            self.close_connection = True
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        try:
            length = int(raw)
        except ValueError as exc:
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Content-Length {raw!r} is not a number") from exc
        limit = self.api.config.http.max_body_bytes
        if length < 0:
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Content-Length {length} is negative")
        if length > limit:
            self.close_connection = True
            self._discard(length)
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {length} bytes is above http.max_body_bytes={limit}")
        try:
            body = self.rfile.read(length)
        except TimeoutError as exc:
            self.close_connection = True
            raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"body not received within {self.timeout} s") from exc
        if len(body) < length:
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {length} bytes")
        return body

    def _discard(self, length: int) -> None:
        """Read (a bounded part of) a refused body, so the client gets our 413 rather than a reset
        connection when it is still sending."""
        self.connection.settimeout(1.0)
        remaining = min(length, _DISCARD_BYTES)
        try:
            while remaining > 0:
                chunk = self.rfile.read1(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass  # the client gave up or stalled: the close that follows is all it gets


class HttpServer:
    def __init__(self, api: Api) -> None:
        handler = type("Handler", (_Handler,), {"api": api})
        host, port = api.config.http.host, api.config.http.port
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6}) \
            if ":" in host else ThreadingHTTPServer
        try:
            self._server = server_class((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"http.port: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="retraind-http", daemon=False)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a serve_forever() that never ran
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()
