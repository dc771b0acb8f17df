"""Rules every request passes before routing, so a new route group gets them without doing anything:

- **Host** (DNS rebinding): the `Host` header must name the address the connection came in on, `localhost`,
  or an `http.allowed_hosts` entry (`*.example.org` matches its sub-domains); anything else is 421.
- **Bearer token**: with `http.token_file`, every path but `http.paths_without_token` and the review page's
  own static files (`/ui/`: no data, and a browser cannot send a header when it opens a page; the page then
  asks for the token and sends it with every API call) needs `Authorization: Bearer <token>`, compared in
  constant time; 401 otherwise.
- **Cross-site callers**: a POST/PUT/PATCH/DELETE whose `Origin` is not this server, or whose
  `Sec-Fetch-Site` is `cross-site`/`same-site`, is 403: a web page the user visits cannot drive the API.
  (State-changing routes also require a JSON content type: see `StateChangingRoute`.)
- **Case**: TF Serving matches its paths case-insensitively; `/v1/models/...` and `/v2/...` are lowercased.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
from http import HTTPStatus
from pathlib import Path

from starlette.datastructures import Headers
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.config import ConfigError, HttpConfig
from daemon.http.errors import ApiError, error_response

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: the review page's static files (daemon/http/review.py mounts them) and the addresses that redirect to them
_PAGE, _PAGE_FILES = ("/", "/ui"), "/ui/"
_CASE_FREE_PREFIXES = ("/v1/models/", "/v2")
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def read_token(http: HttpConfig) -> bytes | None:
    """The bearer token from `http.token_file`, or None when none is configured."""
    if not http.token_file:
        return None
    try:
        token = Path(http.token_file).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"http.token_file: cannot read {http.token_file}: {exc.strerror or exc}") from exc
    if len(token) < 16:
        raise ConfigError(f"http.token_file: {http.token_file} holds {len(token)} bytes; use a random token of "
                          "at least 16 (e.g. `openssl rand -hex 32`)")
    return token


def _host_name(host: str) -> str:
    """`Host` without its port; IPv6 literals without brackets."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _same_address(name: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(address)
    except ValueError:
        return False


class Guard:
    def __init__(self, app: ASGIApp, http: HttpConfig, token: bytes | None) -> None:
        self.app = app
        self.http = http
        self.token = token
        self.allowed = [entry.lower() for entry in http.allowed_hosts]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, message = refusal
            headers = {"WWW-Authenticate": 'Bearer realm="retraind"'} if status == HTTPStatus.UNAUTHORIZED else None
            await error_response(status, message, headers)(scope, receive, send)
            return
        path: str = scope["path"]
        if path.lower().startswith(_CASE_FREE_PREFIXES):
            scope["path"] = path.lower()  # in place: the metrics middleware outside reads the matched route
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = Headers(scope=scope)
        host = _host_name(headers.get("host", "")).lower()
        if not self._host_allowed(host, scope):
            return (HTTPStatus.MISDIRECTED_REQUEST,
                    f"Host {host!r} is not this server's address; add it to http.allowed_hosts to serve it")
        if self.token is not None and not self._without_token(scope["path"]):
            given = headers.get("authorization", "")
            scheme, _, credentials = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self.token):
                return HTTPStatus.UNAUTHORIZED, "send the token of http.token_file as 'Authorization: Bearer ...'"
        if scope["method"] not in _SAFE_METHODS and self._cross_site(headers, host):
            return HTTPStatus.FORBIDDEN, "cross-site requests are refused; call the API from the same origin"
        return None

    def _without_token(self, path: str) -> bool:
        return path in self.http.paths_without_token or path in _PAGE or path.startswith(_PAGE_FILES)

    def _host_allowed(self, host: str, scope: Scope) -> bool:
        server = scope.get("server")
        if not host:  # HTTP/1.0 without Host: no browser sends that, so it cannot be a rebound name
            return True
        if host in _LOCAL_NAMES or (server is not None and _same_address(host, server[0])):
            return True
        return any(fnmatch.fnmatchcase(host, entry) for entry in self.allowed)

    @staticmethod
    def _cross_site(headers: Headers, host: str) -> bool:
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return True
        origin = headers.get("origin")
        if origin is None:
            return False
        authority = origin.partition("://")[2]
        return origin == "null" or authority.lower() != headers.get("host", "").lower()


class StateChangingRoute(Route):
    """A route that changes the daemon's state (retrain, label a file): besides the cross-site refusal that
    every unsafe method gets, it takes only a JSON body (`Content-Type: application/json`), which an HTML
    form cannot send cross-site without a CORS preflight that this server never grants."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = Headers(scope=scope).get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if scope["method"] in (self.methods or set()) - _SAFE_METHODS and media != "application/json":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"{scope['path']} changes state: send Content-Type: application/json (a body of {{}} "
                           "is enough)")
        await super().handle(scope, receive, send)
