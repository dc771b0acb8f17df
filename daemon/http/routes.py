"""The one route table, assembled from each module's `ROUTES`, and the middleware every route passes through
(outermost first): request metrics → Host/token/cross-site rules → the JSON safety net for bugs.

To add a route group: write a module with `ROUTES: list[BaseRoute]` (use `security.StateChangingRoute` for
routes that change state) and add it to `ROUTE_GROUPS`; the middleware applies to it as to every route."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from daemon.http import kserve, ops, review, tfserving
from daemon.http.api import Api
from daemon.http.errors import EXCEPTION_HANDLERS, CatchErrors
from daemon.http.observe import RequestMetrics
from daemon.http.security import Guard

ROUTE_GROUPS: tuple[list[BaseRoute], ...] = (ops.ROUTES, tfserving.ROUTES, kserve.ROUTES, review.ROUTES)


def routes() -> list[BaseRoute]:
    return [route for group in ROUTE_GROUPS for route in group]


def make_app(api: Api, token: bytes | None) -> Starlette:
    app = Starlette(
        routes=routes(),
        middleware=[Middleware(RequestMetrics, metrics=api.metrics),
                    Middleware(Guard, http=api.config.http, token=token),
                    Middleware(CatchErrors, metrics=api.metrics)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.api = api
    return app
