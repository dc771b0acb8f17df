"""The review page (`/ui/`, static files of `daemon/ui/`, no build step, nothing from a CDN) and the JSON API it
drives, which scripts can use too (all listed in `/openapi.json`):

- `GET /v1/review?offset=&limit=`: the queue in groups of near-duplicates, most doubtful first (daemon/review.py);
- `POST /v1/review/{id}:label {"label": L, "group": true}`: move the image (and its near-duplicates) into
  `classes/L/` — the next training run learns from it; `POST /v1/review/{id}:reject {"group": true}`: to
  `rejected/` with a record; `POST /v1/review:undo {}`: undo the newest decision;
- `GET /v1/suspects`, `POST /v1/suspects/{id}:move {"label": L?}`, `:keep {}`, `:remove {}`;
- `GET /v1/review/model`: the serving version's figures and what changed; `GET /v1/review/plots/{name}`;
- `GET /v1/thumbnails/{sha256}`: a JPEG of what the model sees (the decoder's output at the backbone's input
  size), cached under `<state>/thumbnails/` by content hash, so it never goes stale.

Decisions are state-changing routes (JSON body, same-origin, the token when one is configured); they run on
the API's worker pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from daemon.atomic import write_atomic
from daemon.http.api import Api
from daemon.http.body import parse_json, read_parsed
from daemon.http.errors import ApiError
from daemon.http.security import StateChangingRoute
from daemon.images import ImageRejected, read_image_file
from daemon.review import Review
from daemon.review_actions import ActionFailed, ActionRefused

UI_FOLDER = Path(__file__).resolve().parent.parent / "ui"
MAX_PAGE = 200
_SHA256 = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")


def _review(request: Request) -> tuple[Api, Review]:
    api: Api = request.app.state.api
    return api, api.review


async def _off_loop(api: Api, work: Callable[[], T]) -> T:
    """Run file-system work on the API's pool; a missing id is 404, a refused decision 400, one the file
    system refused (read-only, full) 503."""
    try:
        return await asyncio.get_running_loop().run_in_executor(api.pool, work)
    except KeyError as exc:
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such item: {exc.args[0]} (it may have been moved already)") from exc
    except ActionRefused as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
    except ActionFailed as exc:
        raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from exc


async def _options(request: Request) -> dict[str, Any]:
    body = await read_parsed(request, lambda raw: parse_json(raw) if raw.strip() else {})
    if not isinstance(body, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, 'send a JSON object, e.g. {"label": "cats"}')
    return body


def _int_query(request: Request, name: str, default: int, largest: int) -> int:
    raw = request.query_params.get(name, str(default))
    if not raw.isdigit() or int(raw) > largest:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name}: a whole number from 0 to {largest}")
    return int(raw)


async def queue(request: Request) -> JSONResponse:
    """The review queue: groups of near-duplicate images, most doubtful first, paged."""
    api, review = _review(request)
    offset = _int_query(request, "offset", 0, 10**9)
    limit = _int_query(request, "limit", 50, MAX_PAGE)
    groups = await _off_loop(api, review.queue)
    version = api.serving.version
    return JSONResponse({
        "total_groups": len(groups), "total_images": sum(len(g) for g in groups), "offset": offset,
        "limit": limit, "model_version": version.number if version else None,
        "labels": list(version.labels) if version else [],
        "groups": [[item.to_json() for item in group] for group in groups[offset: offset + limit]],
    })


def _chosen(review: Review, item_id: str, body: dict[str, Any]) -> list[str]:
    """The item, and with `"group": true` its near-duplicates (as the queue groups them now)."""
    items = {item.id: item for group in review.queue() for item in group}
    if item_id not in items:
        raise KeyError(item_id)
    return [item_id, *items[item_id].group] if body.get("group") is True else [item_id]


async def label(request: Request) -> JSONResponse:
    """Move a review image (and with `group: true` its near-duplicates) into `classes/<label>/`."""
    api, review = _review(request)
    body = await _options(request)
    item_id = request.path_params["item_id"]
    seq = await _off_loop(api, lambda: review.label(_chosen(review, item_id, body), body.get("label")))
    return JSONResponse({"action": seq, "label": body.get("label")})


async def reject(request: Request) -> JSONResponse:
    """Move a review image (and with `group: true` its near-duplicates) to `rejected/` with a record."""
    api, review = _review(request)
    body = await _options(request)
    item_id = request.path_params["item_id"]
    seq = await _off_loop(api, lambda: review.reject(_chosen(review, item_id, body)))
    return JSONResponse({"action": seq})


async def undo(request: Request) -> JSONResponse:
    """Undo the newest reviewer decision (label, reject, move, remove or keep)."""
    api, review = _review(request)
    await _options(request)
    row = await _off_loop(api, review.actions.undo)
    if row is None:
        raise ApiError(HTTPStatus.NOT_FOUND, "nothing to undo")
    return JSONResponse({"undone": {"action": row.seq, "kind": row.kind}})


async def suspects(request: Request) -> JSONResponse:
    """Training images whose out-of-fold prediction confidently names another label, and the same bytes
    under two labels."""
    api, review = _review(request)
    found = await _off_loop(api, review.suspects)
    return JSONResponse({"total": len(found), "suspects": found})


async def fix_suspect(request: Request) -> JSONResponse:
    """Fix a suspect: `move` (to `label`, default the suggested one), `keep`, or `remove` from training."""
    api, review = _review(request)
    body = await _options(request)
    action = request.path_params["action"]
    seq = await _off_loop(api, lambda: review.fix_suspect(request.path_params["suspect_id"], action,
                                                          body.get("label")))
    return JSONResponse({"action": seq, "kind": action})


async def model(request: Request) -> JSONResponse:
    """The serving version's accuracy, confusion matrix, trust figures and pictures, and what changed."""
    api, review = _review(request)
    return JSONResponse(await _off_loop(api, review.model))


async def plot(request: Request) -> Response:
    """A picture of the serving version (`training_curve.png`, `confusion_matrix.png`, ...)."""
    api, review = _review(request)
    path = await _off_loop(api, lambda: review.plot(request.path_params["name"]))
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})


async def thumbnail(request: Request) -> Response:
    """A JPEG thumbnail of a review or training image by content hash (what the model sees)."""
    api, review = _review(request)
    sha = request.path_params["sha256"]
    if not _SHA256.fullmatch(sha):
        raise ApiError(HTTPStatus.BAD_REQUEST, "give a sha256 in lowercase hex")
    cached = api.config.folder("state") / "thumbnails" / f"{sha}.jpg"

    def make() -> bytes:
        if cached.exists():
            return cached.read_bytes()
        source = review.file_with(sha)
        if source is None:
            raise KeyError(sha)
        try:
            pixels = api.extractor.decode(read_image_file(source, api.config.watch.max_file_bytes).data)
        except (OSError, ImageRejected) as exc:
            raise ActionRefused(f"cannot make a thumbnail: {exc}") from exc
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, buffer.getvalue())
        return buffer.getvalue()

    data = await _off_loop(api, make)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=31536000, immutable"})


async def ui_root(request: Request) -> Response:
    """The review page, for `/ui` and for the server's own address (`/`: what a person types in a browser)."""
    return RedirectResponse("/ui/", status_code=HTTPStatus.MOVED_PERMANENTLY)


ROUTES: list[BaseRoute] = [
    Route("/", ui_root, methods=["GET"], name="root"),
    Route("/ui", ui_root, methods=["GET"], name="ui_root"),
    Mount("/ui", app=StaticFiles(directory=UI_FOLDER, html=True), name="ui"),
    Route("/v1/review", queue, methods=["GET"], name="review_queue"),
    StateChangingRoute("/v1/review:undo", undo, methods=["POST"], name="review_undo"),
    Route("/v1/review/model", model, methods=["GET"], name="review_model"),
    Route("/v1/review/plots/{name}", plot, methods=["GET"], name="review_plot"),
    StateChangingRoute("/v1/review/{item_id}:label", label, methods=["POST"], name="review_label"),
    StateChangingRoute("/v1/review/{item_id}:reject", reject, methods=["POST"], name="review_reject"),
    Route("/v1/suspects", suspects, methods=["GET"], name="suspects"),
    StateChangingRoute("/v1/suspects/{suspect_id}:{action}", fix_suspect, methods=["POST"], name="suspect_fix"),
    Route("/v1/thumbnails/{sha256}", thumbnail, methods=["GET"], name="thumbnail"),
]
