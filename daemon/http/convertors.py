"""Path parameter types of the protocol routes, registered with Starlette before any route is built:
`model` (a model name: no `/` or `:`), `address` (TF Serving's optional `/versions/N` or `/labels/L`) and
`kversion` (KServe's optional `/versions/N`). The optional ones may match nothing."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class _Text(Convertor[str]):
    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class ModelName(_Text):
    regex = "[^/:]+"


class TfServingAddress(_Text):
    regex = "(?:/versions/[0-9]+|/labels/[^/:]+)?"


class KServeVersion(_Text):
    regex = "(?:/versions/[^/]+)?"


register_url_convertor("model", ModelName())
register_url_convertor("address", TfServingAddress())
register_url_convertor("kversion", KServeVersion())
