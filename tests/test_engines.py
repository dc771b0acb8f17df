"""The TFLite engine gives the Keras engine's bottlenecks (so both share a backbone id) and TensorFlow's own
interpreter's, is converted once and cached under the state dir (a missing, stale or damaged cache is converted
again, a damaged one never loaded), and `backbone.engine` picks it, refuses it or falls back from it as
documented; the daemon warms its engine before it says it is ready."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.backbone import Backbone
from daemon.config import BackboneConfig
from daemon.engines import cpu_quota, default_threads, gains_from_batches, sees_gpu, select_engine
from daemon.hookspecs import hookimpl
from daemon.keras_engine import KerasBackbone
from daemon.tflite_engine import (
    CACHE_FORMAT,
    TOLERANCE,
    EngineMismatch,
    TfliteBackbone,
    cache_path,
    engine_difference,
    legacy_cache_path,
    manifest_path,
    tflite_backbone,
)
from tests.conftest import Lite0Conversion, image_bytes, seed_classes, wait_for, write_image
from tests.test_http_api import MODEL, call
from tests.tiny_backbone import TinyBackbonePlugin, build_tiny

#: LiteRT and TensorFlow's interpreter run the same flatbuffer with the same kernels: their bottlenecks must
#: agree far inside the Keras tolerance.
INTERPRETER_TOLERANCE = 1e-5


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


def _converted_once(tmp_path: Path) -> tuple[KerasBackbone, CountingBuilder, Path]:
    keras_backbone = build_tiny()
    builder = CountingBuilder(lambda: keras_backbone)
    tflite_backbone(builder, keras_backbone.id, tmp_path, threads=1)
    return keras_backbone, builder, cache_path(tmp_path, keras_backbone.id)


def test_a_conversion_without_its_manifest_is_converted_again(tmp_path: Path) -> None:
    """A crash between the model and its manifest (the manifest is written last), or a half-written file."""
    keras_backbone, builder, path = _converted_once(tmp_path)
    manifest_path(path).unlink()
    path.write_bytes(b"half a flatbuffer")

    converted = tflite_backbone(builder, keras_backbone.id, tmp_path, threads=1)

    assert builder.calls == 2 and path.stat().st_size > 1000 and manifest_path(path).is_file()
    assert engine_difference(converted, keras_backbone) <= TOLERANCE


def test_a_stale_conversion_is_converted_again(tmp_path: Path) -> None:
    keras_backbone, builder, path = _converted_once(tmp_path)
    manifest = json.loads(manifest_path(path).read_text())
    manifest_path(path).write_text(json.dumps({**manifest, "format": CACHE_FORMAT - 1}))

    tflite_backbone(builder, keras_backbone.id, tmp_path, threads=1)

    assert builder.calls == 2
    assert json.loads(manifest_path(path).read_text())["format"] == CACHE_FORMAT
    tflite_backbone(builder, keras_backbone.id, tmp_path, threads=1)
    assert builder.calls == 2  # the new conversion is kept


def test_a_damaged_conversion_is_detected_by_its_hash_and_never_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """One flipped bit in the weights still loads and runs, giving wrong bottlenecks: only the hash sees it."""
    keras_backbone, builder, path = _converted_once(tmp_path)
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x40
    path.write_bytes(bytes(damaged))

    converted = tflite_backbone(builder, keras_backbone.id, tmp_path, threads=1)

    assert builder.calls == 2 and "is damaged" in caplog.text
    assert path.read_bytes() == good
    images = _images(3, converted.input_size)
    np.testing.assert_allclose(converted.embed(images), keras_backbone.embed(images), rtol=0, atol=TOLERANCE)


def _tf_interpreter_embed(model: bytes, images: np.ndarray) -> np.ndarray:
    """TensorFlow's own (deprecated) interpreter on the same flatbuffer, one image per invoke."""
    import warnings

    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"\s*Warning: tf\.lite\.Interpreter is deprecated", UserWarning)
        interpreter = tf.lite.Interpreter(model_content=model, num_threads=2)
    interpreter.allocate_tensors()
    (pixels,), (features,) = interpreter.get_input_details(), interpreter.get_output_details()
    out = []
    for image in images:
        interpreter.set_tensor(pixels["index"], image[None])
        interpreter.invoke()
        out.append(interpreter.get_tensor(features["index"])[0])
    return np.stack(out)


def test_litert_gives_tf_lite_interpreter_bottlenecks(tmp_path: Path) -> None:
    keras_backbone, _, path = _converted_once(tmp_path)
    converted = TfliteBackbone(path.read_bytes(), keras_backbone.id, threads=2)
    images = _images(5, converted.input_size, seed=9)

    np.testing.assert_allclose(converted.embed(images), _tf_interpreter_embed(path.read_bytes(), images), rtol=0,
                               atol=INTERPRETER_TOLERANCE)


@pytest.mark.parametrize("threads", [2, 3])
def test_several_images_run_on_lanes_with_the_same_bits(tmp_path: Path, threads: int) -> None:
    """One image runs on the interpreter with every thread; several on `LANES` interpreters sharing the
    threads (made at the first batch), each lane taking the next image when it is free. The bottlenecks are
    the same bits either way, in the images' order, whatever the batch's length; a bad batch raises and the
    engine goes on."""
    keras_backbone, _, path = _converted_once(tmp_path)
    converted = TfliteBackbone(path.read_bytes(), keras_backbone.id, threads=threads)
    images = _images(7, converted.input_size, seed=4)
    one_by_one = np.concatenate([converted.embed(image[None]) for image in images])
    lanes: set[str] = set()
    threading.setprofile(lambda *_: lanes.add(threading.current_thread().name))
    try:
        assert not [t for t in threading.enumerate() if t.name == "retraind-engine-lane"]
        for count in (2, 3, 7):
            assert np.array_equal(converted.embed(images[:count]), one_by_one[:count]), count
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    assert "retraind-engine-lane" in lanes
    assert np.array_equal(converted.embed(images[:1]), one_by_one[:1])
    with pytest.raises(ValueError):
        converted.embed(np.zeros((3, 8, 8, 3), dtype=np.uint8))
    assert np.array_equal(converted.embed(images), one_by_one)


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
    assert not list(tmp_path.iterdir())  # a refused conversion is not kept

    chosen = select_engine(BackboneConfig(engine="auto"), tmp_path, loud.id, lambda: loud, "tflite")

    assert chosen is loud
    assert "running the Keras engine" in caplog.text or sees_gpu()
    assert chosen.fell_back_from == ("tflite" if not sees_gpu() else None)


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
        # HTTP requests are run one by one in the batcher's turns (the engine gains nothing from batches)
        assert not gains_from_batches(app.backbone)
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda seed: call(app, "POST", f"{MODEL}:classify", image_bytes("blue", seed)),
                                    range(4)))
        assert [(code, body["predictions"][0]["top_k"][0]["label"]) for code, _, body in replies] == [(200, "blue")] * 4
    record = json.loads((data / "results.jsonl").read_text().splitlines()[0])
    assert record["label"] == "blue" and record["backbone"] == "tiny/seed7/v1"


def test_the_daemon_warms_its_engine_before_it_is_ready(run_app: Any, tiny: TinyBackbonePlugin) -> None:
    with run_app(http={"enabled": False}):  # no images at all: the one forward is the warm-up
        assert tiny.warm_ups == [1] and tiny.images_embedded == 0


def test_efficientnet_lite0_tflite_equals_keras_and_tf_lite(lite0_conversion: Lite0Conversion) -> None:
    """The default backbone on real photos; measured difference about 1e-5 against Keras (tolerance 1e-4), and
    against TensorFlow's interpreter on the same flatbuffer, well inside 1e-5."""
    import skimage.data
    from PIL import Image

    keras_backbone, converted = lite0_conversion.keras, lite0_conversion.tflite
    photos = np.stack([np.asarray(Image.fromarray(load()).resize((224, 224), Image.Resampling.BILINEAR))
                       for load in (skimage.data.chelsea, skimage.data.coffee, skimage.data.astronaut)])

    got, want = converted.embed(photos), keras_backbone.embed(photos)

    assert converted.id == keras_backbone.id and got.shape == (3, 1280)
    assert np.abs(want).max() > 1.0  # real activations, not a dead network
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
    model = cache_path(lite0_conversion.weights, converted.id).read_bytes()
    np.testing.assert_allclose(got, _tf_interpreter_embed(model, photos), rtol=0, atol=INTERPRETER_TOLERANCE)


class LoudEnginePlugin:
    """A network whose TFLite conversion disagrees with Keras, offered with the real engine choice."""

    @hookimpl
    def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
        if config.name != "loud":
            return None
        return select_engine(config, cache_dir, "loud/v1", _loud_backbone, cpu_engine="tflite")


def test_the_daemon_counts_an_engine_fallback(run_app: Any) -> None:
    """KIND: a failure logged and survived at start-up (`auto` runs Keras because TFLite failed) is counted too."""
    if sees_gpu():
        pytest.skip("with a GPU, auto runs the Keras engine by choice, not as a fallback")
    with run_app(backbone={"name": "loud", "engine": "auto"}, extra=(LoudEnginePlugin(),)) as app:
        assert app.backbone.fell_back_from == "tflite"  # type: ignore[attr-defined]
        assert app.metrics.registry.get_sample_value("retraind_internal_errors_total",
                                                     {"where": "engine_fallback"}) == 1


def test_one_conversion_serves_every_preprocessing_version_of_a_network(tmp_path: Path) -> None:
    """A new preprocessing version (a migration, daemon/migration.py) converts nothing: the conversion depends
    on the network only. An upgraded store keeps its conversion under the v1 id's name; it is taken from there."""
    keras_backbone, builder, path = _converted_once(tmp_path)
    legacy = legacy_cache_path(tmp_path, keras_backbone.id)
    path.rename(legacy)
    manifest_path(path).rename(manifest_path(legacy))

    v2 = tflite_backbone(builder, "tiny/seed7/v2", tmp_path, threads=1)

    assert builder.calls == 1 and v2.id == "tiny/seed7/v2" and path.is_file()
    assert engine_difference(v2, keras_backbone) <= TOLERANCE
    legacy.unlink()
    assert tflite_backbone(builder, "tiny/seed7/v3", tmp_path, threads=1).id == "tiny/seed7/v3"
    assert builder.calls == 1


def _cgroup_file(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def test_a_cgroup_cpu_quota_caps_the_threads(tmp_path: Path) -> None:
    """Kind: a container or service limited to fewer CPUs than it sees (`docker run --cpus=1`, systemd's
    `CPUQuota=100%`) ran one engine thread per visible core, throttled. The smallest quota on the cgroup's path
    counts, cgroup v2 or v1; no quota, or none readable, is None."""
    v2, membership = tmp_path / "v2", tmp_path / "cgroup"
    membership.write_text("0::/system.slice/retraind.service\n")
    _cgroup_file(v2, "cpu.max", "max 100000\n")
    _cgroup_file(v2 / "system.slice", "cpu.max", "150000 100000\n")
    _cgroup_file(v2 / "system.slice" / "retraind.service", "cpu.max", "max 100000\n")
    assert cpu_quota(v2, membership) == 1.5
    (v2 / "system.slice" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2, membership) is None

    v1 = tmp_path / "v1"
    membership.write_text("4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    _cgroup_file(v1 / "cpu,cpuacct", "cpu.cfs_quota_us", "200000\n")  # a container sees its cgroup at the root
    _cgroup_file(v1 / "cpu,cpuacct", "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(v1, membership) == 2.0
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1, membership) is None
    assert cpu_quota(tmp_path / "none", tmp_path / "missing") is None
    assert 1 <= default_threads() <= (os.cpu_count() or 1)


def test_a_process_in_a_cgroup_with_a_one_cpu_quota_runs_one_thread(tmp_path: Path) -> None:
    """The same through the kernel: a real cgroup v1 `cpu` group with a quota of one CPU (root and a writable
    cgroup v1 hierarchy needed: skipped with the reason otherwise)."""
    group = Path("/sys/fs/cgroup/cpu") / f"retraind-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup v1 cpu group here: {exc}")
    try:
        (group / "cpu.cfs_quota_us").write_text(str(int((group / "cpu.cfs_period_us").read_text())))
        probe = "from daemon.engines import default_threads; print(default_threads())"
        done = subprocess.run(["sh", "-c", f'echo $$ > {group}/tasks && exec "$0" -c "$1"', sys.executable, probe],
                              capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
        assert done.stdout.strip() == "1", done
    finally:
        group.rmdir()
