"""A tiny real Keras backbone for fast tests, registered through the real `retraind_make_backbone` hook.

32×32 input, one seeded convolution and global pooling: 16 features that separate colours and textures well
enough to learn a two-class task in a second, while exercising the same engine as the real backbones."""

from __future__ import annotations

from pathlib import Path

from daemon.backbone import Backbone
from daemon.config import BackboneConfig
from daemon.hookspecs import hookimpl
from daemon.keras_engine import KerasBackbone

NAME = "tiny"


def build_tiny(preprocessing: str = "v1") -> Backbone:
    import keras

    init = keras.initializers.GlorotUniform(seed=7)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", kernel_initializer=init)(inputs)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    return KerasBackbone(keras.Model(inputs, outputs), f"{NAME}/seed7/{preprocessing}", scale=1.0 / 255.0, offset=0.0)


class TinyBackbonePlugin:
    """Counts forward calls so tests can prove what was (not) recomputed: `images_embedded` counts the images
    of the test, `warm_ups` the sizes of the engine's all-black warm-up batches, in order. `preprocessing`: the
    version its id names (`tiny/seed7/<preprocessing>`; the network is the same whatever it is)."""

    def __init__(self, preprocessing: str = "v1") -> None:
        self.preprocessing = preprocessing
        self.backbone: Backbone | None = None
        self.images_embedded = 0
        self.warm_ups: list[int] = []

    def __getstate__(self) -> dict[str, object]:
        """Sent to `retraind bulk`'s Ray workers without its network (a traced graph cannot be pickled): each
        worker builds its own, and counts only its own forward passes."""
        return {"preprocessing": self.preprocessing, "backbone": None, "images_embedded": 0, "warm_ups": []}

    @hookimpl
    def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
        if config.name != NAME:
            return None
        if self.backbone is None:
            self.backbone = build_tiny(self.preprocessing)
        plugin = self

        class Counting:
            id, input_size, dim = self.backbone.id, self.backbone.input_size, self.backbone.dim

            def embed(self, images):  # type: ignore[no-untyped-def]
                if images.any():
                    plugin.images_embedded += len(images)
                else:
                    plugin.warm_ups.append(len(images))
                return plugin.backbone.embed(images)  # type: ignore[union-attr]

        return Counting()
