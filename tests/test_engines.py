"""The TFLite engine gives the Keras engine's bottlenecks (so both share a backbone id), is converted once and
cached under the state dir, and `backbone.engine` picks it, refuses it or falls back from it as documented."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.backbone import Backbone
from daemon.config import BackboneConfig
from daemon.hookspecs import hookimpl
from daemon.keras_engine import KerasBackbone
from daemon.tflite_engine import (
    TOLERANCE,
    EngineMismatch,
    TfliteBackbone,
    cache_path,
    engine_difference,
    sees_gpu,
    select_engine,
    tflite_backbone,
)
from tests.conftest import seed_classes, wait_for, write_image
from tests.tiny_backbone import build_tiny


class CountingBuilder:
    """A `make_keras` factory that counts how often the Keras network had to be built."""

    def __init__(self, make: Callable[[], KerasBackbone]) -> None:
        self.make, self.calls = make, 0

    def __call__(self) -> KerasBackbone:
        self.calls += 1
        return self.make()


def _images(count: int, size: tuple[int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size[1], size[0], 3), dtype=np.uint8)


def test_tiny_tflite_equals_keras_and_is_converted_once(tmp_path: Path) -> None:
    keras_backbone = build_tiny()
    builder = CountingBuilder(lambda: keras_backbone)

    converted = tflite_backbone(builder, keras_backbone.id, tmp_path, threads=1)

    assert isinstance(converted, TfliteBackbone)
    assert (converted.id, converted.input_size, converted.dim) == (keras_backbone.id, (32, 32), 16)
    assert cache_path(tmp_path, keras_backbone.id).is_file() and builder.calls == 1
    for count in (1, 5, 2):  # one image, a batch, a smaller batch after it
        images = _images(count, converted.input_size, seed=count)
        got, want = converted.embed(images), keras_backbone.embed(images)
        assert got.shape == (count, 16) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)

    again = tflite_backbone(builder, keras_backbone.id, tmp_path, threads=2)

    assert builder.calls == 1  # served from the cache: no Keras build, no conversion
    images = _images(3, again.input_size)
    np.testing.assert_array_equal(again.embed(images), converted.embed(images))


def test_a_damaged_cache_file_is_converted_again(tmp_path: Path) -> None:
    keras_backbone = build_tiny()
    path = cache_path(tmp_path, keras_backbone.id)
    path.write_bytes(b"half a flatbuffer")
    builder = CountingBuilder(lambda: keras_backbone)

    converted = tflite_backbone(builder, keras_backbone.id, tmp_path, threads=1)

    assert builder.calls == 1 and path.stat().st_size > 1000
    assert engine_difference(converted, keras_backbone) <= TOLERANCE


def _loud_backbone() -> KerasBackbone:
    """Features around 1e7: the engines sum in different orders, so float32 rounding alone sets them apart
    by far more than the tolerance. A network like this must not share its id across engines."""
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, kernel_initializer=keras.initializers.RandomUniform(-3e4, 3e4, seed=3))(inputs)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    return KerasBackbone(keras.Model(inputs, outputs), "loud/v1", scale=1.0, offset=0.0)


def test_engines_that_disagree_are_refused_or_fall_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loud = _loud_backbone()

    with pytest.raises(EngineMismatch, match="backbone.engine: the TFLite conversion of loud/v1 differs"):
        select_engine(BackboneConfig(engine="tflite"), tmp_path, loud.id, lambda: loud, "tflite")
    assert not cache_path(tmp_path, loud.id).exists()  # a refused conversion is not kept

    chosen = select_engine(BackboneConfig(engine="auto"), tmp_path, loud.id, lambda: loud, "tflite")

    assert chosen is loud
    assert "running the Keras engine" in caplog.text or sees_gpu()


def test_engine_choice(tmp_path: Path) -> None:
    keras_backbone = build_tiny()
    builder = CountingBuilder(lambda: keras_backbone)

    def choose(engine: str, cpu_engine: str = "tflite", threads: int = 0) -> Backbone:
        return select_engine(BackboneConfig(engine=engine, threads=threads), tmp_path, keras_backbone.id, builder,
                             cpu_engine)

    assert choose("keras") is keras_backbone
    assert not list(tmp_path.iterdir())
    chosen = choose("tflite", cpu_engine="keras", threads=1)  # asked for by name: the preference is moot
    assert isinstance(chosen, TfliteBackbone) and chosen.threads == 1
    assert isinstance(choose("auto"), KerasBackbone if sees_gpu() else TfliteBackbone)
    assert choose("auto", cpu_engine="keras") is keras_backbone
    # keras, the one conversion, keras again (auto on a CPU found the conversion cached; on a GPU it built Keras)
    assert builder.calls == 3 + sees_gpu()


class TinyEnginePlugin:
    """The tiny network offered through the real hook with the real engine choice, as the built-ins do."""

    @hookimpl
    def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
        if config.name != "tiny_engines":
            return None
        return select_engine(config, cache_dir, "tiny/seed7/v1", build_tiny, cpu_engine="tflite")


def test_daemon_runs_on_the_tflite_engine(tmp_path: Path, run_app: Any) -> None:
    seed_classes(tmp_path, per_label=8)
    data = tmp_path / "data"
    with run_app(backbone={"name": "tiny_engines", "engine": "tflite"}, extra=(TinyEnginePlugin(),)) as app:
        assert isinstance(app.backbone, TfliteBackbone)
        assert cache_path(data / "state" / "weights", app.backbone.id).is_file()
        wait_for(lambda: app.serving.version, what="first model")
        write_image(data / "inbox" / "which.jpg", "blue", seed=4242)
        wait_for(lambda: (data / "results.jsonl").exists(), what="a result record")
    record = json.loads((data / "results.jsonl").read_text().splitlines()[0])
    assert record["label"] == "blue" and record["backbone"] == "tiny/seed7/v1"


def test_efficientnet_lite0_tflite_equals_keras(tmp_path: Path) -> None:
    """The default backbone on real photos; measured difference about 1e-5 against a tolerance of 1e-4."""
    import skimage.data
    from PIL import Image

    from plugins import efficientnet_lite0

    keras_backbone = efficientnet_lite0.build("imagenet")
    converted = tflite_backbone(lambda: keras_backbone, keras_backbone.id, tmp_path, threads=2)
    photos = np.stack([np.asarray(Image.fromarray(load()).resize((224, 224), Image.Resampling.BILINEAR))
                       for load in (skimage.data.chelsea, skimage.data.coffee, skimage.data.astronaut)])

    got, want = converted.embed(photos), keras_backbone.embed(photos)

    assert converted.id == keras_backbone.id and got.shape == (3, 1280)
    assert np.abs(want).max() > 1.0  # real activations, not a dead network
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
