"""What the core knows of a backbone: a small Protocol over numpy arrays, so TensorFlow stays behind a seam."""

from __future__ import annotations

from typing import Protocol

import numpy as np


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
