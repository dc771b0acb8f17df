"""HTTP on loopback: Prometheus `/metrics`, `/healthz`, `/readyz`, and a small TF-Serving-shaped model API.

Every error is a JSON body with a 4xx/5xx status, never a traceback; request bodies are size-limited."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.config import Config
from daemon.extractor import Extractor
from daemon.images import ImageRejected
from daemon.metrics import Metrics
from daemon.serving import ServingModel

log = logging.getLogger(__name__)

MODEL_NAME = "retraind"
_MODEL_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?P<rest>/metadata|:classify|:retrain)?$")


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Api:
    """What the handlers need from the daemon, gathered so the handler class stays stateless."""

    def __init__(
        self, config: Config, metrics: Metrics, serving: ServingModel, extractor: Extractor,
        retrain: Callable[[], None], alive: Callable[[], bool],
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
                "images": m.get("images"), "created": m.get("created")}

    def classify(self, body: bytes, content_type: str) -> dict[str, Any]:
        version = self._version()
        images = [self._decode(data) for data in _payloads(body, content_type)]
        vectors = self.extractor.embed(np.stack(images))
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
    """Raw image bytes, or TF-Serving's `{"instances": [{"b64": ...}, ...]}`."""
    if not body:
        raise ApiError(HTTPStatus.BAD_REQUEST, "empty body: send image bytes or {\"instances\":[{\"b64\":...}]}")
    if not content_type.startswith("application/json"):
        return [body]
    try:
        instances = json.loads(body)["instances"]
        payloads = [base64.b64decode(item["b64"], validate=True) for item in instances]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"expected {{\"instances\":[{{\"b64\":...}}]}}: {exc}") from exc
    if not payloads:
        raise ApiError(HTTPStatus.BAD_REQUEST, "instances is empty")
    return payloads


class _Handler(BaseHTTPRequestHandler):
    api: Api
    server_version = "retraind"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode())

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except ApiError as exc:
            self._json(exc.status, {"error": str(exc)})
        except Exception:
            log.exception("HTTP %s %s failed", self.command, self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the daemon's log"})

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(HTTPStatus.OK, generate_latest(self.api.metrics.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            alive = self.api.alive()
            self._json(HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE, {"alive": alive})
        elif path == "/readyz":
            version = self.api.serving.version
            status = HTTPStatus.OK if version else HTTPStatus.SERVICE_UNAVAILABLE
            self._json(status, {"ready": version is not None, "model_version": version.number if version else 0})
        else:
            match = self._model_route()
            if match.group("rest") == "/metadata":
                self._json(HTTPStatus.OK, self.api.metadata())
            elif match.group("rest") is None:
                self._json(HTTPStatus.OK, self.api.status())
            else:
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{match.group('rest')} needs POST")

    def _post(self) -> None:
        match = self._model_route()
        if match.group("rest") == ":classify":
            body = self._body()
            self._json(HTTPStatus.OK, self.api.classify(body, self.headers.get("Content-Type", "")))
        elif match.group("rest") == ":retrain":
            self.api.retrain()
            self._json(HTTPStatus.ACCEPTED, {"retrain": "requested"})
        else:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, "POST goes to :classify or :retrain")

    def _model_route(self) -> re.Match[str]:
        match = _MODEL_PATH.match(self.path.split("?", 1)[0])
        if match is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
        if match.group("name") != MODEL_NAME:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no model named {match.group('name')!r}; it is {MODEL_NAME!r}")
        return match

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError as exc:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required") from exc
        if length > self.api.config.http.max_body_bytes:
            self.close_connection = True
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {length} bytes is above http.max_body_bytes={self.api.config.http.max_body_bytes}")
        return self.rfile.read(length)


class HttpServer:
    def __init__(self, api: Api) -> None:
        handler = type("Handler", (_Handler,), {"api": api})
        self._server = ThreadingHTTPServer((api.config.http.host, api.config.http.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="retraind-http", daemon=False)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
