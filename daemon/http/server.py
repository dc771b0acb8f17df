"""Uvicorn serving the Starlette app on its own event loop, in the named thread `retraind-http`, started and
stopped with the daemon (`App.start`/`App.stop`; nothing is left running).

Uvicorn gives keep-alive (`http.keep_alive_seconds`), a real listen backlog (`http.backlog`), `100 Continue`
sent only when a handler starts reading the body, and graceful shutdown. It has no limit on how long or how
big a request's head may be; `_GuardedProtocol` adds both (`http.header_timeout_seconds`, 64 KiB), and answers
malformed requests with a JSON 400 instead of Uvicorn's plain-text one."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from daemon.config import ConfigError, HttpConfig, is_loopback

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
_START_TIMEOUT_SECONDS = 30.0


def _json_reply(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _HeadTooLarge(Exception):
    """Raised from a parser callback once a request's head is over `MAX_HEAD_BYTES` (its 431 is sent)."""


class _GuardedProtocol(HttpToolsProtocol):
    """Uvicorn's httptools protocol with a deadline and a size limit for each request's head."""

    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = 0  # None once the head is complete
        self._head_parsed = 0  # the request line's target and the headers parsed so far, in bytes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_bytes is not None:  # still inside a head after this data
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request line and headers are above {MAX_HEAD_BYTES} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_parsed = 0
        if self._head_bytes is None:
            self._head_bytes = 0
            self._arm()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        """The limit on what the parser has taken: `data_received` counts only heads still incomplete after
        a read, so a whole head that arrived in one or two reads (70 KB sent at once) went through."""
        self._head_parsed += size
        if self._head_parsed > MAX_HEAD_BYTES:
            self._refuse(431, "Request Header Fields Too Large",
                         f"the request line and headers are above {MAX_HEAD_BYTES} bytes")
            raise _HeadTooLarge  # stops the parser; Uvicorn's handler of parser errors finds the reply sent

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_bytes = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        """A refusal sent before the body was read (413, 503): the rest of the body is read and dropped by the
        parser, so the connection stays usable and the client gets the answer rather than a reset; one that
        keeps trickling is closed after `header_timeout`."""
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._disarm()
            self._head_timer = self.loop.call_later(self.header_timeout, self.transport.close)

    def on_message_complete(self) -> None:
        if self._head_bytes is None:
            self._disarm()  # the lingering body of a refused request has ended
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "Bad Request", f"malformed HTTP request: {msg}")

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._refuse(408, "Request Timeout",
                     f"request headers not received within http.header_timeout_seconds={self.header_timeout}")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_json_reply(status, reason, message))
            self.transport.close()


def _bind(http: HttpConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
    try:
        return socket.create_server((http.host, http.port), family=family, backlog=http.backlog)
    except OSError as exc:
        raise ConfigError(f"http.port: cannot listen on {http.host}:{http.port}: {exc.strerror or exc}") from exc


class HttpServer:
    def __init__(self, app: ASGIApp, http: HttpConfig) -> None:
        self._socket = _bind(http)
        protocol = type("Protocol", (_GuardedProtocol,), {"header_timeout": http.header_timeout_seconds})
        config = uvicorn.Config(
            app, http=protocol, lifespan="off", log_config=None, access_log=False, backlog=http.backlog,
            timeout_keep_alive=http.keep_alive_seconds,  # type: ignore[arg-type]  # float seconds work
            timeout_graceful_shutdown=5, server_header=False, proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._http = http
        self._thread = threading.Thread(target=self._serve, name="retraind-http", daemon=False)
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """Where clients reach the server, e.g. `http://127.0.0.1:9721/` (IPv6 addresses in brackets)."""
        host = self._http.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def _access(self) -> str:
        if self._http.token_file:
            return (f"bearer token of http.token_file required, except on "
                    f"{', '.join(self._http.paths_without_token) or 'no path'}")
        if is_loopback(self._http.host):
            return "no token required: loopback only"
        return "no token required: http.allow_unauthenticated is set, anyone who reaches it may call it"

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as exc:  # reported by start(), and logged
            self._failure = exc
            log.exception("the HTTP server stopped")

    def start(self) -> None:
        """Start serving; returns once the socket accepts (raises if the server could not start)."""
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start: {self._failure!r}")
            time.sleep(0.01)
        log.info("HTTP API listening on %s (%s)", self.url, self._access())

    def stop(self) -> None:
        """Finish the requests in hand (at most 5 s), close every connection, join the thread."""
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join()
        self._socket.close()
