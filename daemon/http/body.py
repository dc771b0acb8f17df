"""Request bodies read within limits: a declared length above `http.max_body_bytes` is refused with 413 before
any of it is read (so a client that sent `Expect: 100-continue` gets the 413 instead of `100 Continue`, and
sends nothing); a chunked body is counted as it comes; a body that stalls gets 408 after
`http.body_timeout_seconds`. JSON that Python's parser cannot take safely (nesting deeper than it recurses,
integers past its digit limit) is a 400, like any other malformed JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from daemon.http.errors import ApiError

#: Bodies above this are parsed off the event loop (a 16 MiB JSON document takes ~0.1 s to parse).
_PARSE_INLINE_BYTES = 256 * 1024
_CLOSE = {"Connection": "close"}
T = TypeVar("T")


def _unread(request: Request) -> dict[str, str] | None:
    """Headers for a refusal sent before the body is read: a client that sent `Expect: 100-continue` will
    not send the body, so the connection must close; any other one is sending it, and the server reads and
    drops it (see server._GuardedProtocol) so the client reads the refusal instead of a reset."""
    return _CLOSE if request.headers.get("expect", "").lower() == "100-continue" else None


def _check_declared_length(request: Request, limit: int) -> None:
    """Refuse a declared Content-Length above `limit` before any byte of the body is read."""
    raw = request.headers.get("content-length")
    if raw is None:
        return
    if not raw.isdigit():
        raise ApiError(HTTPStatus.BAD_REQUEST, f"Content-Length {raw!r} is not a non-negative number", _CLOSE)
    length = int(raw)
    if length > limit:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"body of {length} bytes is above http.max_body_bytes={limit}", _unread(request))


async def read_body(request: Request) -> bytes:
    """The whole body, within `http.max_body_bytes` and `http.body_timeout_seconds`."""
    http = request.app.state.api.config.http
    _check_declared_length(request, http.max_body_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(http.body_timeout_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > http.max_body_bytes:
                    raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"body is above http.max_body_bytes={http.max_body_bytes}")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ApiError(HTTPStatus.REQUEST_TIMEOUT,
                       f"body not received within http.body_timeout_seconds={http.body_timeout_seconds}",
                       _CLOSE) from exc
    except ClientDisconnect as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, "the client closed the connection before the body ended") from exc
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """Decoded JSON; any malformed or hostile document is an ApiError 400."""
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, "JSON nested too deeply") from exc
    except ValueError as exc:  # also UnicodeDecodeError and int() past sys.get_int_max_str_digits()
        raise ApiError(HTTPStatus.BAD_REQUEST, f"not valid JSON: {exc}") from exc


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words for an error message: `null`, `an object`, `an array`."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kinds = {dict: "an object", list: "an array", str: "a string"}
    return next((kind for cls, kind in kinds.items() if isinstance(value, cls)), "a number")


async def read_parsed(request: Request, parse: Callable[[bytes], T]) -> T:
    """The body, read within the limits, then `parse`d: on the event loop when small, on the decoding pool
    when large (a 16 MiB JSON document takes about 0.1 s to parse, which would stall every other request)."""
    body = await read_body(request)
    if len(body) <= _PARSE_INLINE_BYTES:
        return parse(body)
    return await asyncio.get_running_loop().run_in_executor(request.app.state.api.pool, parse, body)
