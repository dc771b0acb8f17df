"""Operations endpoints: `/metrics` (Prometheus text, or OpenMetrics when asked), `/healthz` (the daemon's
threads are alive), `/readyz` (a model is loaded and the engine warmed up), `/openapi.json`."""

from __future__ import annotations

from http import HTTPStatus

from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from daemon.http.api import Api
from daemon.http.openapi import openapi


async def metrics(request: Request) -> Response:
    """Prometheus metrics (OpenMetrics when the scraper asks for it)."""
    api: Api = request.app.state.api
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(api.metrics.registry), media_type=content_type)


async def healthz(request: Request) -> JSONResponse:
    """Health: `ok`, `degraded` (a watched folder is missing) or `down` (a worker thread ended); 503 unless ok."""
    health = request.app.state.api.health()
    ok = health["status"] == "ok"
    return JSONResponse(health, status_code=HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)


async def readyz(request: Request) -> JSONResponse:
    """Readiness: a model is loaded and the engine warmed up."""
    api: Api = request.app.state.api
    version = api.serving.version
    ready = api.ready()
    return JSONResponse({"ready": ready, "model_version": version.number if version else 0},
                        status_code=HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE)


ROUTES: list[BaseRoute] = [
    Route("/metrics", metrics, methods=["GET"], name="metrics"),
    Route("/healthz", healthz, methods=["GET"], name="healthz"),
    Route("/readyz", readyz, methods=["GET"], name="readyz"),
    Route("/openapi.json", openapi, methods=["GET"], name="openapi"),
]
