"""`GET /openapi.json`: an OpenAPI 3.1 document built from the route table itself, so every route, a later
group's included, is documented: its path (TF Serving's optional `/versions/N` and `/labels/L` and KServe's
`/versions/N` written out as separate paths, since OpenAPI has no optional segments), method, operation id
(the route's name), summary (the endpoint's docstring) and, for the protocol routes, the request bodies.
Routes of ours beyond the protocols carry `x-retraind-extension: true`."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from daemon import __version__
from daemon.http.security import StateChangingRoute

_EXPANSIONS = {
    "{name:model}": ["{model}"],
    "{address:address}": ["", "/versions/{version}", "/labels/{label}"],
    "{version:kversion}": ["", "/versions/{version}"],
}
_B64 = {"type": "object", "properties": {"b64": {"type": "string", "contentEncoding": "base64"}}, "required": ["b64"]}
_TF_REQUEST = {"oneOf": [
    {"type": "object", "properties": {"signature_name": {"enum": ["serving_default", "classify"]},
                                      "instances": {"type": "array", "items": _B64}}, "required": ["instances"]},
    {"type": "object", "properties": {"signature_name": {"enum": ["serving_default", "classify"]},
                                      "inputs": {"type": "object", "properties": {
                                          "image_bytes": {"type": "array", "items": _B64}}}}, "required": ["inputs"]},
    {"type": "object", "properties": {"examples": {"type": "array", "items": {
        "type": "object", "properties": {"image_bytes": _B64}}}}, "required": ["examples"]},
]}
_IMAGE = {"description": "an encoded image file (retraind extension)", "schema": {"type": "string", "format": "binary"}}
_BODIES: dict[str, dict[str, Any]] = {
    "tfserving_predict": {"application/json": {"schema": _TF_REQUEST}, "image/*": _IMAGE},
    "tfserving_classify": {"application/json": {"schema": _TF_REQUEST}, "image/*": _IMAGE},
    "retrain": {"application/json": {"schema": {"type": "object"}}},
    "kserve_infer": {
        "application/json": {"schema": {"type": "object", "description": "Open Inference Protocol request; one "
                                        "BYTES input `image_bytes` of shape [N]", "required": ["inputs"]}},
        "application/octet-stream": {"description": "binary tensor data extension: the JSON header "
                                     "(Inference-Header-Content-Length bytes), then the BYTES elements",
                                     "schema": {"type": "string", "format": "binary"}},
    },
}
_PROTOCOL_PREFIXES = ("tfserving_", "kserve_")
_EXTENDED = {"tfserving_classify"}  # a protocol route whose raw-image body and top_k answer are ours


def _paths(template: str) -> list[str]:
    paths = [template]
    for token, choices in _EXPANSIONS.items():
        paths = [p.replace(token, choice) for p in paths for choice in choices]
    return [re.sub(r"\{(\w+):\w+\}", r"{\1}", p) for p in paths]


def _operation(route: Route, method: str, path: str) -> dict[str, Any]:
    name = route.name
    suffix = "_by_version" if "{version}" in path else "_by_label" if "{label}" in path else ""
    operation: dict[str, Any] = {
        "operationId": f"{name}{suffix}" + (f"_{method}" if len(route.methods or ()) > 2 else ""),
        "summary": (route.endpoint.__doc__ or name).strip().splitlines()[0],
        "tags": [name.split("_")[0] if name.startswith(_PROTOCOL_PREFIXES) else "retraind"],
        "responses": {"200": {"description": "OK"}, "default": {"description": "an error", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
    }
    if name in _BODIES and method == "post":
        operation["requestBody"] = {"required": name != "retrain", "content": _BODIES[name]}
    if not name.startswith(_PROTOCOL_PREFIXES) or name in _EXTENDED or isinstance(route, StateChangingRoute):
        operation["x-retraind-extension"] = True
    return operation


def document(routes: list[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if isinstance(route, Mount):  # static files (the review page): one GET per mount
            paths[f"{route.path}/{{file}}"] = {"get": {
                "operationId": route.name, "summary": f"static files under {route.path}/ (index.html at {route.path}/)",
                "tags": ["retraind"], "x-retraind-extension": True,
                "responses": {"200": {"description": "the file"}, "404": {"description": "no such file"}}}}
            continue
        if not isinstance(route, Route):
            continue
        for path in _paths(route.path):
            for method in sorted((route.methods or set()) - {"HEAD"}):
                paths.setdefault(path, {})[method.lower()] = _operation(route, method.lower(), path)
    return {
        "openapi": "3.1.0",
        "info": {"title": "retraind", "version": __version__,
                 "description": "TF Serving REST and KServe v2 (Open Inference Protocol) for a self-training "
                                "image classifier; paths under /v1/models and /v2 match case-insensitively"},
        "paths": paths,
        "components": {"schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}},
                                             "required": ["error"]}},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "when http.token_file is set"}}},
    }


async def openapi(request: Request) -> JSONResponse:
    """This document: every route of the table, with our extensions marked."""
    return JSONResponse(document(request.app.routes))
