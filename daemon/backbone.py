"""What the core knows of a backbone: a small Protocol over numpy arrays, so TensorFlow stays behind a seam."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Protocol

import numpy as np

#: The preprocessing (decoding and resizing to the input size, `plugins.pillow_decoder`) new bottlenecks are made
#: with: the last part of each built-in backbone's id, so bottlenecks of two preprocessing versions never mix.
#: v1: Pillow's BILINEAR for every picture. v2: pictures enlarged to the input by OpenCV's INTER_LINEAR (within 1
#: level of v1's pixels, 4-5x cheaper; yet bottlenecks differ by 2.4 % in L2 on average on tuxpaint6, far beyond
#: the engines' 1e-4: not the same preprocessing), reductions as in v1. A store of v1 bottlenecks is migrated:
#: its model keeps serving with v1 while the images are cached again under v2 (`daemon.migration`).
PREPROCESSING = "v2"
#: The preprocessing of an id without a version part (a third-party backbone's): the only one there was before
#: versions were named, so such a backbone keeps its pixels when the shipped preprocessing moves on.
UNVERSIONED = "v1"
_VERSION = re.compile(r"v[0-9]+")


class BackboneUnavailable(Exception):
    """The configured backbone cannot be built (weights missing, offline, ...); the message says what to set."""


class Backbone(Protocol):
    """A frozen feature extractor: decoded RGB images in, one bottleneck vector per image out.

    `id` names the network, its weights and its preprocessing; it is part of every bottleneck's store key,
    so two backbones (or two preprocessing versions) never share cached vectors. A backbone that runs one
    image per pass (a batch of N costs N single passes) may say so with a class attribute
    `one_image_per_pass = True` (`daemon.engines.gains_from_batches`).
    """

    id: str
    input_size: tuple[int, int]
    dim: int

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Map uint8 images of shape (N, height, width, 3) to float32 bottlenecks of shape (N, dim)."""
        ...


def preprocessing_of(backbone_id: str) -> str:
    """The preprocessing version an id names: its last `/` part when that is `v<digits>` (`efficientnet_lite0/
    0123abcd/v1` -> `v1`), else `UNVERSIONED`."""
    last = backbone_id.rsplit("/", 1)[-1]
    return last if _VERSION.fullmatch(last) else UNVERSIONED


def network_of(backbone_id: str) -> str:
    """The network and weights an id names: the id without its preprocessing part (`efficientnet_lite0/
    0123abcd/v1` -> `efficientnet_lite0/0123abcd`); the whole id when it has none."""
    head, _, last = backbone_id.rpartition("/")
    return head if head and _VERSION.fullmatch(last) else backbone_id


class ServedAs:
    """`backbone`'s network under another id of the same network (another preprocessing version): what a model
    trained on that id is served with while the store is re-cached under the configured one. `embed` is the
    backbone's own (the one engine); only `id`, hence the store key and the decoder's preprocessing, differ.
    Raises ValueError when `backbone_id` names another network."""

    def __init__(self, backbone: Backbone, backbone_id: str) -> None:
        if network_of(backbone_id) != network_of(backbone.id):
            raise ValueError(f"{backbone_id} is another network than {backbone.id}")
        self.id, self.input_size, self.dim = backbone_id, backbone.input_size, backbone.dim
        self.one_image_per_pass = getattr(backbone, "one_image_per_pass", False)
        self.backbone = backbone  # the network itself, under its own id (what an export writes)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """The backbone's bottlenecks (N, dim) for uint8 images (N, height, width, 3)."""
        return self.backbone.embed(images)


def served_as(backbone: Backbone, backbone_id: str, preprocessings: Collection[str]) -> Backbone | None:
    """The configured `backbone` for a model trained on `backbone_id`: itself for its own id; a `ServedAs` for
    the same network under another preprocessing version the decoder makes (`preprocessings`, from
    `Hooks.preprocessing_versions`: the published model of a store being migrated); None for another network
    or a version no decoder makes (that model cannot be run without building its own network)."""
    if backbone_id == backbone.id:
        return backbone
    if network_of(backbone_id) == network_of(backbone.id) and preprocessing_of(backbone_id) in preprocessings:
        return ServedAs(backbone, backbone_id)
    return None
