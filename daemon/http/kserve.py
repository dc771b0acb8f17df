"""KServe v2 / Open Inference Protocol (Triton's HTTP API), as `tritonclient.http` speaks it:

- `GET /v2` (server metadata), `/v2/health/live`, `/v2/health/ready`;
- `GET /v2/models/retraind[/versions/N]` (model metadata) and `.../ready`;
- `POST /v2/models/retraind[/versions/N]/infer`: one input `image_bytes`, datatype `BYTES`, shape `[N]`, each
  element an encoded image file; one output `probabilities` (`FP32`, `[N, labels]`, in `labels.txt` order).

Extensions: binary tensor data (`Inference-Header-Content-Length`: the first bytes of the body are the JSON
header, then each input with `parameters.binary_data_size`; BYTES elements are a 4-byte little-endian length
and the bytes; outputs with `binary_data: true`, or all when `binary_data_output` is set, come back the same
way) and classification (`parameters: {"classification": k}` on the output → a BYTES tensor `[N, k]` of
`"score:index:label"` strings, best first). Compressed bodies (`Content-Encoding`) are not accepted."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from daemon import __version__
from daemon.http import MODEL_NAME, convertors  # noqa: F401 - registers the path types
from daemon.http.api import Api
from daemon.http.body import parse_json, read_parsed
from daemon.http.errors import ApiError
from daemon.http.payloads import INPUT
from daemon.registry import ModelVersion

OUTPUT = "probabilities"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "inference-header-content-length"
SHAPE = (f'one input {{"name": "{INPUT}", "datatype": "BYTES", "shape": [N]}} holding N encoded image files, '
         "sent with the binary tensor data extension (tritonclient: InferInput(..., 'BYTES').set_data_from_numpy("
         "np.array([file_bytes], dtype=object), binary_data=True))")


def _shape_error(problem: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, f"{problem}; send {SHAPE}")


def _model(request: Request) -> tuple[Api, ModelVersion]:
    api: Api = request.app.state.api
    api.check_model(request.path_params["name"])
    raw = request.path_params["version"].removeprefix("/versions/")
    if raw and not raw.isdigit():
        raise ApiError(HTTPStatus.NOT_FOUND, f"version {raw!r} is not a version number")
    return api, api.version(int(raw) if raw else None)


async def server_metadata(request: Request) -> JSONResponse:
    """KServe v2 server metadata: name, version, extensions."""
    return JSONResponse({"name": MODEL_NAME, "version": __version__, "extensions": EXTENSIONS})


async def live(request: Request) -> JSONResponse:
    """KServe v2 liveness: the daemon's threads are alive."""
    alive = request.app.state.api.health()["status"] != "down"  # degraded (a folder missing) still serves
    return JSONResponse({"live": alive}, status_code=HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE)


async def ready(request: Request) -> JSONResponse:
    """KServe v2 readiness: a model is loaded and the engine warmed up."""
    is_ready = request.app.state.api.ready()
    return JSONResponse({"ready": is_ready},
                        status_code=HTTPStatus.OK if is_ready else HTTPStatus.SERVICE_UNAVAILABLE)


async def model_metadata(request: Request) -> JSONResponse:
    """KServe v2 model metadata: versions, the BYTES input, the FP32 output."""
    api, version = _model(request)
    versions = [str(version.number)] if request.path_params["version"] else [str(n) for n in api.versions()]
    return JSONResponse({
        "name": MODEL_NAME, "versions": versions, "platform": f"retraind_{version.backbone.split('/')[0]}",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(version.labels)]}],
    })


async def model_ready(request: Request) -> JSONResponse:
    """KServe v2 model readiness (404 for an unknown model or version)."""
    _model(request)  # 404 for an unknown model or version (the engine was warmed up before the server started)
    return JSONResponse({"name": MODEL_NAME, "ready": True})


def _split(body: bytes, raw: str | None) -> tuple[Any, bytes]:
    """The JSON header and the binary part of an inference request (`raw`: Inference-Header-Content-Length)."""
    if raw is None:
        return parse_json(body), b""
    if not raw.isdigit() or int(raw) > len(body):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"Inference-Header-Content-Length {raw!r} does not fit a body of "
                                               f"{len(body)} bytes")
    return parse_json(body[: int(raw)]), body[int(raw) :]


def _elements(data: bytes) -> list[bytes]:
    """BYTES tensor elements from the binary extension's encoding (4-byte little-endian length + bytes)."""
    out, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ApiError(HTTPStatus.BAD_REQUEST, "binary BYTES data ends inside an element's length")
        (size,) = struct.unpack_from("<I", data, offset)
        if offset + 4 + size > len(data):
            raise ApiError(HTTPStatus.BAD_REQUEST, "binary BYTES data ends inside an element")
        out.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return out


def _images(header: Any, binary: bytes) -> list[bytes]:
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise _shape_error("the request has no inputs list")
    inputs = header["inputs"]
    names = [i.get("name") if isinstance(i, dict) else None for i in inputs]
    if names != [INPUT]:
        raise _shape_error(f"inputs are named {names}")
    (tensor,) = inputs
    shape = tensor.get("shape")
    if tensor.get("datatype") != "BYTES" or not (isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
        raise _shape_error(f"{INPUT} is {tensor.get('datatype')} {shape}")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"binary_data_size {size!r} is not the {len(binary)} bytes "
                                                   "after the JSON header")
        elements = _elements(binary)
    else:
        data = np.asarray(tensor.get("data", []), dtype=object).ravel().tolist()
        if not all(isinstance(d, str) for d in data):
            raise _shape_error("BYTES data in JSON must be strings")
        elements = [d.encode() for d in data]
    if len(elements) != int(np.prod(shape)):
        raise _shape_error(f"shape {shape} does not hold the {len(elements)} elements sent")
    return elements


@dataclass(frozen=True)
class _Requested:
    """One requested output: top-k strings (`classification`) or probabilities, binary or in the JSON."""

    classification: int | None
    binary: bool


def _requested(header: dict[str, Any]) -> list[_Requested]:
    """The outputs asked for, checked before any work is done."""
    default_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    out = []
    for output in header.get("outputs") or [{"name": OUTPUT}]:
        if not isinstance(output, dict) or output.get("name") != OUTPUT:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"outputs: the only output is {OUTPUT!r}")
        parameters = output.get("parameters") or {}
        k = parameters.get("classification")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ApiError(HTTPStatus.BAD_REQUEST, "classification: give a count of 1 or more")
        out.append(_Requested(k, bool(parameters.get("binary_data", default_binary))))
    return out


def _tensor(requested: _Requested, version: ModelVersion, probabilities: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """An output tensor and its binary form."""
    if requested.classification is None:
        tensor = {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape),
                  "data": probabilities.ravel().tolist()}
        return tensor, probabilities.astype("<f4").tobytes()
    k = min(requested.classification, len(version.labels))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    strings = [f"{p[i]:f}:{i}:{version.labels[i]}" for p, idx in zip(probabilities, order) for i in idx]
    raw = b"".join(struct.pack("<I", len(e)) + e for e in (s.encode() for s in strings))
    return {"name": OUTPUT, "datatype": "BYTES", "shape": [len(probabilities), k], "data": strings}, raw


async def infer(request: Request) -> Response:
    """KServe v2 inference: BYTES image files in, probabilities (or classification strings) out."""
    api, version = _model(request)
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "compressed request bodies are not accepted")
    header, binary = await read_parsed(request, partial(_split, raw=request.headers.get(HEADER_LENGTH)))
    images = _images(header, binary)
    requested = _requested(header)
    probabilities = await api.probabilities(images, version)
    tensors, out = [], b""
    for wanted in requested:
        tensor, raw = _tensor(wanted, version, probabilities)
        if wanted.binary:
            del tensor["data"]
            tensor["parameters"] = {"binary_data_size": len(raw)}
            out += raw
        tensors.append(tensor)
    reply: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": str(version.number), "outputs": tensors}
    if isinstance(header.get("id"), str):
        reply["id"] = header["id"]
    if not out:
        return JSONResponse(reply)
    text = json.dumps(reply).encode()
    return Response(text + out, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})


_BASE = "/v2/models/{name:model}{version:kversion}"
ROUTES: list[BaseRoute] = [
    Route("/v2", server_metadata, methods=["GET"], name="kserve_server_metadata"),
    Route("/v2/health/live", live, methods=["GET"], name="kserve_live"),
    Route("/v2/health/ready", ready, methods=["GET"], name="kserve_ready"),
    Route(_BASE, model_metadata, methods=["GET"], name="kserve_model_metadata"),
    Route(f"{_BASE}/ready", model_ready, methods=["GET"], name="kserve_model_ready"),
    Route(f"{_BASE}/infer", infer, methods=["POST"], name="kserve_infer"),
]
