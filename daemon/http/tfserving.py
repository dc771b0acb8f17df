"""TF Serving's REST API (`tensorflow_serving/model_servers/http_rest_api_handler.cc`), so a client written for
a TF Serving fleet works unchanged, with the exported SavedModel's signatures (daemon/export.py):

- `GET /v1/models/retraind[/versions/N|/labels/L]`: version status (every kept version, or the one addressed);
- `GET .../metadata`: `model_spec` and `metadata.signature_def`, plus our labels, backbone, accuracy and `trust`
  (target precision, thresholds, expected coverage, calibration error: daemon/trust.py);
- `POST ...:predict`: `signature_name` `serving_default` (→ `probabilities` [N, labels] in `labels.txt` order)
  or `classify` (→ `classes`, `scores` [N, labels], best first); row requests answer `predictions`, columnar
  ones `outputs`, as TF Serving does;
- `POST ...:classify`: TF Serving's `examples` → `result` ([label, score] pairs, best first), or our shape for
  a raw body or `instances` (`predictions[].top_k`, the top `classify.top_k`);
- `POST ...:retrain` (ours): train now.

Paths are matched case-insensitively (security.Guard lowercases them); `N` is any kept version, `L` is
`stable` (serving) or `candidate` (the last version the gate rejected)."""

from __future__ import annotations

from functools import partial
from http import HTTPStatus
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from daemon.http import MODEL_NAME, convertors  # noqa: F401 - registers the path types
from daemon.http.api import Api
from daemon.http.body import parse_json, read_body, read_parsed
from daemon.http.errors import ApiError
from daemon.http.payloads import INPUT, parse
from daemon.http.security import StateChangingRoute
from daemon.registry import ModelVersion

SIGNATURES = ("serving_default", "classify")


def _api(request: Request) -> Api:
    api: Api = request.app.state.api
    api.check_model(request.path_params["name"])
    return api


def _addressed(request: Request) -> ModelVersion:
    api = _api(request)
    kind, _, value = request.path_params["address"].strip("/").partition("/")
    if kind == "versions":
        return api.version(number=int(value))
    if kind == "labels":
        return api.version(label=value)
    return api.version()


def _tensor(dtype: str, dims: list[int], name: str = "") -> dict[str, Any]:
    return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                                             "unknown_rank": False}, "name": name}


def signature_def(labels: int) -> dict[str, Any]:
    """The exported SavedModel's signatures in TF Serving's metadata JSON (`SignatureDefMap`)."""
    def signature(name: str, outputs: dict[str, Any]) -> dict[str, Any]:
        return {"inputs": {INPUT: _tensor("DT_STRING", [-1], f"{name}_{INPUT}:0")}, "outputs": outputs,
                "method_name": "tensorflow/serving/predict"}

    return {"signature_def": {
        "serving_default": signature("serving_default", {"probabilities": _tensor("DT_FLOAT", [-1, labels])}),
        "classify": signature("classify", {"classes": _tensor("DT_STRING", [-1, labels]),
                                           "scores": _tensor("DT_FLOAT", [-1, labels])}),
    }}


def _state(number: int, state: str = "AVAILABLE", code: str = "OK", message: str = "") -> dict[str, Any]:
    return {"version": str(number), "state": state, "status": {"error_code": code, "error_message": message}}


async def status(request: Request) -> JSONResponse:
    """TF Serving model status: every kept version, or the one addressed."""
    api = _api(request)
    if request.path_params["address"]:
        return JSONResponse({"model_version_status": [_state(_addressed(request).number)]})
    if api.serving.version is None:
        return JSONResponse({"model_version_status": [_state(0, "START", "UNAVAILABLE", "no model trained yet")]})
    return JSONResponse({"model_version_status": [_state(n) for n in reversed(api.versions())]})


async def metadata(request: Request) -> JSONResponse:
    """TF Serving model metadata with the SavedModel's signature_def, plus labels, backbone and accuracy."""
    version = _addressed(request)
    m = version.metrics
    return JSONResponse({
        "model_spec": {"name": MODEL_NAME, "signature_name": "", "version": str(version.number)},
        "metadata": {"signature_def": signature_def(len(version.labels))},
        "labels": list(version.labels), "backbone": version.backbone, "accuracy": m.get("accuracy"),
        "per_class_accuracy": m.get("per_class_accuracy"), "manifest_sha256": m.get("manifest_sha256"),
        "images": m.get("images"), "created": m.get("created"), "trust": m.get("trust"),
        "label_conflicts": m.get("label_conflicts", []),
    })


def _ranked(version: ModelVersion, probabilities: np.ndarray) -> tuple[list[list[str]], list[list[float]]]:
    """Labels and scores per row, best first (the `classify` signature's stable descending order)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    labels = np.asarray(version.labels, dtype=object)
    return labels[order].tolist(), np.take_along_axis(probabilities, order, axis=1).tolist()


async def predict(request: Request) -> JSONResponse:
    """TF Serving predict: serving_default → probabilities, classify → classes and scores."""
    version = _addressed(request)
    api: Api = request.app.state.api
    parsed = await read_parsed(request, partial(parse, content_type=request.headers.get("content-type", "")))
    signature = parsed.signature_name or "serving_default"
    if signature not in SIGNATURES:
        raise ApiError(HTTPStatus.BAD_REQUEST, f'Serving signature name: "{signature}" not found in signature def '
                                               f"(signatures: {', '.join(SIGNATURES)})")
    if parsed.format == "examples":
        raise ApiError(HTTPStatus.BAD_REQUEST, ":predict takes instances or inputs; examples go to :classify")
    probabilities = await api.probabilities(parsed.images, version)
    columnar = parsed.format == "inputs"
    if signature == "serving_default":
        values: Any = probabilities.tolist()
        return JSONResponse({"outputs": values} if columnar else {"predictions": values})
    classes, scores = _ranked(version, probabilities)
    if columnar:
        return JSONResponse({"outputs": {"classes": classes, "scores": scores}})
    return JSONResponse({"predictions": [{"classes": c, "scores": s} for c, s in zip(classes, scores)]})


async def classify(request: Request) -> JSONResponse:
    """TF Serving classify (examples → result), or an image body / instances → top-k (ours)."""
    version = _addressed(request)
    api: Api = request.app.state.api
    parsed = await read_parsed(request, partial(parse, content_type=request.headers.get("content-type", "")))
    probabilities = await api.probabilities(parsed.images, version)
    classes, scores = _ranked(version, probabilities)
    if parsed.format == "examples":
        return JSONResponse({"result": [[[c, s] for c, s in zip(cs, ss)] for cs, ss in zip(classes, scores)]})
    k = api.config.classify.top_k
    return JSONResponse({"model_version": version.number, "predictions": [
        {"top_k": [{"label": c, "score": round(s, 6)} for c, s in zip(cs[:k], ss[:k])]}
        for cs, ss in zip(classes, scores)]})


async def retrain(request: Request) -> JSONResponse:
    """Train a new head now, whatever the quiet period says, unless the training set is unchanged (ours)."""
    api = _api(request)
    if body := await read_body(request):
        parse_json(body)  # a JSON body (e.g. {}); its fields are reserved for later options
    unchanged = api.retrain()  # the serving version when the training set has not changed since it
    if unchanged is not None:
        return JSONResponse({"retrain": "unchanged", "model_version": unchanged.number})
    return JSONResponse({"retrain": "requested"}, status_code=HTTPStatus.ACCEPTED)


_BASE = "/v1/models/{name:model}{address:address}"
ROUTES: list[BaseRoute] = [
    Route(_BASE, status, methods=["GET"], name="tfserving_status"),
    Route(f"{_BASE}/metadata", metadata, methods=["GET"], name="tfserving_metadata"),
    Route(f"{_BASE}:predict", predict, methods=["POST"], name="tfserving_predict"),
    Route(f"{_BASE}:classify", classify, methods=["POST"], name="tfserving_classify"),
    StateChangingRoute(f"{_BASE}:retrain", retrain, methods=["POST"], name="retrain"),
]
