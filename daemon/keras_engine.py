"""Running a Keras feature extractor as a `Backbone`: uint8 in, float32 bottlenecks out, one traced graph.

TensorFlow is imported only when a backbone is built, so the rest of the daemon (and most tests) never pay
for it unless they need a network."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np


class KerasBackbone:
    """Wraps `model` (float input in the network's own scale) with a scaling `scale * x + offset` from uint8."""

    def __init__(self, model: Any, backbone_id: str, scale: float, offset: float) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ start-up chatter is not for a service log
        import tensorflow as tf

        self.id = backbone_id
        height, width = (int(d) for d in model.input_shape[1:3])
        self.input_size = (width, height)
        self.dim = int(model.output_shape[-1])
        self.model = model
        signature = [tf.TensorSpec([None, height, width, 3], tf.uint8)]

        @tf.function(input_signature=signature, reduce_retracing=True)
        def forward(images: Any) -> Any:
            return model(tf.cast(images, tf.float32) * scale + offset, training=False)

        self._forward: Callable[[np.ndarray], Any] = forward

    def embed(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._forward(images), dtype=np.float32)
