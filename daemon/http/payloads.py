"""The encoded images of a TF Serving REST request. Accepted shapes (anything else is a 400 naming them):

- the image file itself as the body (any content type but JSON and multipart);
- row format `{"instances": [{"b64": ...}, ...]}` or `{"instances": [{"image_bytes": {"b64": ...}}, ...]}`;
- columnar format `{"inputs": [{"b64": ...}, ...]}` or `{"inputs": {"image_bytes": [{"b64": ...}, ...]}}`;
- `:classify`'s `{"examples": [{"image_bytes": {"b64": ...}}, ...]}`.

`image_bytes` is the input name of the exported SavedModel's signatures (daemon/export.py)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from daemon.http.body import json_kind, parse_json
from daemon.http.errors import ApiError

INPUT = "image_bytes"
SHAPES = ('send the image file as the body, or JSON: {"instances": [{"b64": "..."}]} (row format), '
          '{"inputs": {"image_bytes": [{"b64": "..."}]}} (columnar), or, for :classify, '
          '{"examples": [{"image_bytes": {"b64": "..."}}]}')


@dataclass(frozen=True)
class Request:
    """What a request asked for: the images, which JSON format (None for a raw body), and the signature."""

    images: list[bytes]
    format: str | None
    signature_name: str | None


def _shape_error(problem: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, f"{problem}; {SHAPES}")


def _b64(value: Any, where: str) -> bytes:
    if isinstance(value, dict) and set(value) == {INPUT}:
        value = value[INPUT]
    if not (isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str)):
        raise _shape_error(f"{where} is not {{\"b64\": \"...\"}}")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{where}: invalid base64 ({exc})") from exc


def _values(document: dict[str, Any]) -> tuple[str, list[Any]]:
    formats = [key for key in ("instances", "inputs", "examples") if key in document]
    if len(formats) != 1:
        raise _shape_error(f"give exactly one of instances, inputs, examples (got {sorted(document) or 'none'})")
    (key,) = formats
    values = document[key]
    if key == "inputs" and isinstance(values, dict):
        if set(values) != {INPUT}:
            raise _shape_error(f"inputs names {sorted(values)}; the only input is {INPUT!r}")
        values = values[INPUT]
    if key == "inputs" and isinstance(values, dict | str):
        values = [values]
    if not isinstance(values, list):
        raise _shape_error(f"{key} is {json_kind(values)}, not a list")
    return key, values


def parse(body: bytes, content_type: str) -> Request:
    """The images of a request body; ApiError 400 for a shape not listed above."""
    media = content_type.split(";")[0].strip().lower()
    if media.startswith("multipart/"):
        raise _shape_error("multipart bodies are not accepted")
    if not body:
        raise _shape_error("empty body")
    if not (media == "application/json" or body.lstrip()[:1] in (b"{", b"[")):
        return Request([body], None, None)  # an image: no image format starts with { or [
    document = parse_json(body)
    if not isinstance(document, dict):
        raise _shape_error(f"the JSON body is {json_kind(document)}, not an object")
    key, values = _values(document)
    signature = document.get("signature_name")
    if signature is not None and not isinstance(signature, str):
        raise _shape_error("signature_name is not a string")
    return Request([_b64(v, f"{key}[{i}]") for i, v in enumerate(values)], key, signature)
