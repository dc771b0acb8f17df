"""What the core knows of a backbone: a small Protocol over numpy arrays, so TensorFlow stays behind a seam."""

from __future__ import annotations

from typing import Protocol

import numpy as np

#: The version of the shipped preprocessing (decoding and resizing to the input size, `plugins.pillow_decoder`),
#: the last part of each built-in backbone's id, so bottlenecks cached under another preprocessing are never
#: mixed with new ones: a change recomputes them and retrains. v1: Pillow's BILINEAR for every picture. v2:
#: pictures enlarged to the input by OpenCV's INTER_LINEAR (within 1 level of v1's pixels, yet bottlenecks
#: differ by 2.4 % in L2 on average on tuxpaint6, far beyond the engines' 1e-4: not the same preprocessing).
PREPROCESSING = "v2"


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
