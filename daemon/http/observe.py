"""Request metrics: `retraind_http_requests_total{route,method,code}`, `retraind_http_request_duration_seconds`
by route and `retraind_http_inflight_requests`. The route label is the matched route's name (a fixed set),
never the raw path, so a scan of random URLs cannot blow up the series count."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.metrics import Metrics

UNMATCHED = "unmatched"


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        code = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        self.metrics.http_inflight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.http_inflight.dec()
            route = scope.get("route")
            name = getattr(route, "name", None) or UNMATCHED
            self.metrics.http_requests.labels(route=name, method=scope["method"], code=str(code)).inc()
            self.metrics.http_seconds.labels(route=name).observe(time.perf_counter() - started)
