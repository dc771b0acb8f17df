"""Every refusal is a JSON body `{"error": "..."}` with a 4xx/5xx status, never a traceback or an HTML page
(TF Serving's REST API and KServe v2 both use this shape)."""

from __future__ import annotations

import logging
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.metrics import Metrics

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the API refuses: sent as `{"error": message}` with `status` (and any extra headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, str(exc), exc.headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, method not allowed) in our shape."""
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == HTTPStatus.NOT_FOUND:
        message = f"no such endpoint: {request.url.path}"
    elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED and exc.headers:
        allowed = exc.headers.get("Allow", "")
        message = f"{request.method} is not allowed here; use {' or '.join(sorted(allowed.split(', ')))}"
    return error_response(exc.status_code, message, dict(exc.headers or {}))


EXCEPTION_HANDLERS = {ApiError: _api_error, HTTPException: _http_exception}


class CatchErrors:
    """Innermost safety net: a bug in a route is logged with its path, counted, and answered as a JSON 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("HTTP %s %s failed", scope.get("method"), scope.get("path"))
            self.metrics.internal_error("http_request")
            if not started and scope["type"] == "http":
                response = error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the daemon's log")
                await response(scope, receive, send)
