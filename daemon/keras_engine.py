"""Running a Keras feature extractor as a `Backbone`: uint8 in, float32 bottlenecks out, one traced graph.

The network is wrapped once behind a uint8 input and its own scaling (a `Rescaling` layer computing
`float(x) * scale + offset`), so this engine and the TFLite engine (daemon/tflite_engine.py, converted from
this very wrapper) run the same graph. TensorFlow is imported only when a backbone is built, so the rest of
the daemon (and most tests) never pay for it unless they need a network."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np


def silence_tensorflow() -> None:
    """TensorFlow's C++ start-up chatter is not for a service log; call before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class KerasBackbone:
    """Wraps `model` (float input in the network's own scale) with a scaling `scale * x + offset` from uint8.

    The forward pass is a `tf.function` over a batch of any size. `model.predict_on_batch` was measured
    against it on EfficientNet-Lite0, batch 32, 2 cores: equal within the noise of a shared machine (medians
    59-107 img/s for both over alternating runs), and on a GPU Keras would XLA-compile `predict_on_batch`
    again for every new batch size, so the plain traced function stays.
    """

    def __init__(self, model: Any, backbone_id: str, scale: float, offset: float) -> None:
        #: the engine `backbone.engine: auto` meant to run when it ran this one instead (it failed), else None
        self.fell_back_from: str | None = None
        silence_tensorflow()
        import keras
        import tensorflow as tf

        self.id = backbone_id
        height, width = (int(d) for d in model.input_shape[1:3])
        self.input_size = (width, height)
        self.dim = int(model.output_shape[-1])
        self.model = model
        pixels = keras.Input((height, width, 3), dtype="uint8", name="pixels")
        #: the uint8 network both engines run (the TFLite engine converts exactly this model)
        self.network = keras.Model(pixels, model(keras.layers.Rescaling(scale, offset)(pixels)))
        signature = [tf.TensorSpec([None, height, width, 3], tf.uint8)]

        @tf.function(input_signature=signature, reduce_retracing=True)  # type: ignore[untyped-decorator]
        def forward(images: Any) -> Any:
            return self.network(images, training=False)

        self._forward: Callable[[np.ndarray], Any] = forward

    def embed(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._forward(images), dtype=np.float32)
