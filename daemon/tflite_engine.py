"""The TFLite engine: a Keras backbone converted once by TensorFlow's own converter, cached under the state
dir, and run by the TFLite interpreter with XNNPACK; and the `backbone.engine` choice between the two.

`auto` runs, on a CPU, the engine the backbone's plugin measured faster (`cpu_engine`); where TensorFlow sees
a GPU it runs Keras, which uses it while the interpreter would stay on the CPU; and where the conversion
fails or does not match, Keras. Measured on 2 cores, random uint8 input: EfficientNet-Lite0 Keras batch 32
about 60-105 img/s against the interpreter with 2 threads, one image per `invoke`, 160-205 img/s (batch 32
about 180); Inception v3 9.2 against 11.9 img/s on an idle machine (equal within the noise on a busy one).

Both engines run the same graph (`KerasBackbone.network`), and a converted model is used only after its
bottlenecks matched the Keras ones within `TOLERANCE` on probe images; so both engines share one backbone id,
and switching engines recomputes no cached bottleneck and keeps the published model valid.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from daemon.atomic import write_atomic
from daemon.backbone import Backbone, BackboneUnavailable
from daemon.config import BackboneConfig
from daemon.keras_engine import KerasBackbone, silence_tensorflow

log = logging.getLogger(__name__)

#: The largest difference in any bottleneck value allowed between the engines. Measured: 1.5e-5 for Lite0 over
#: the 403 tuxpaint6 images (values up to 5.8), 4e-9 for Inception v3 with random weights.
TOLERANCE = 1e-4
_PROBE_IMAGES = 4


class EngineMismatch(BackboneUnavailable):
    """The converted network does not give the Keras bottlenecks; it is not used (nor kept)."""


class TfliteBackbone:
    """A converted backbone run one image per `invoke` (measured faster than batches of 32 on 2 cores for
    Lite0, the same for Inception v3), behind a lock: an interpreter must not be entered by two threads."""

    def __init__(self, path: Path, backbone_id: str, threads: int) -> None:
        silence_tensorflow()
        import tensorflow as tf

        with warnings.catch_warnings():
            # TF 2.21 still ships the interpreter but points to the separate ai-edge-litert package, which
            # measured no faster here; only this one deprecation warning is hidden.
            warnings.filterwarnings("ignore", r"\s*Warning: tf\.lite\.Interpreter is deprecated", UserWarning)
            self._interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
        self._interpreter.allocate_tensors()
        (pixels,) = self._interpreter.get_input_details()
        (features,) = self._interpreter.get_output_details()
        self._input, self._output = pixels["index"], features["index"]
        self.id = backbone_id
        self.input_size = (int(pixels["shape"][2]), int(pixels["shape"][1]))
        self.dim = int(features["shape"][-1])
        self.threads = threads
        self._lock = threading.Lock()

    def embed(self, images: np.ndarray) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with self._lock:
            for row, image in enumerate(images):
                self._interpreter.set_tensor(self._input, image[None])
                self._interpreter.invoke()
                out[row] = self._interpreter.get_tensor(self._output)[0]
        return out


def cache_path(cache_dir: Path, backbone_id: str) -> Path:
    """Where the converted model of `backbone_id` is kept: a readable name plus a hash (ids hold slashes)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_id)
    return cache_dir / f"{readable}-{hashlib.sha256(backbone_id.encode()).hexdigest()[:12]}.tflite"


def convert(keras_backbone: KerasBackbone) -> bytes:
    """The uint8 network as a TFLite flatbuffer (float32 weights, no quantisation: features must not move)."""
    import tensorflow as tf

    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints every captured variable while exporting
        return bytes(tf.lite.TFLiteConverter.from_keras_model(keras_backbone.network).convert())


def engine_difference(a: Backbone, b: Backbone) -> float:
    """The largest bottleneck difference between two engines on seeded noise images."""
    width, height = a.input_size
    probe = np.random.default_rng(0).integers(0, 256, (_PROBE_IMAGES, height, width, 3), dtype=np.uint8)
    return float(np.max(np.abs(a.embed(probe) - b.embed(probe))))


def tflite_backbone(make_keras: Callable[[], KerasBackbone], backbone_id: str, cache_dir: Path,
                    threads: int) -> TfliteBackbone:
    """The cached conversion of `backbone_id`, or a new one (built, converted, checked against Keras, kept)."""
    path = cache_path(cache_dir, backbone_id)
    if path.is_file():
        try:
            return TfliteBackbone(path, backbone_id, threads)
        except (ValueError, RuntimeError) as exc:  # what the interpreter raises for a damaged model file
            log.warning("cached TFLite model %s cannot be loaded (%s); converting again", path, exc)
    keras_backbone = make_keras()
    log.info("converting backbone %s to TFLite (once; kept in %s)", backbone_id, path)
    write_atomic(path, convert(keras_backbone))
    converted = TfliteBackbone(path, backbone_id, threads)
    difference = engine_difference(converted, keras_backbone)
    if not difference <= TOLERANCE:
        path.unlink()
        raise EngineMismatch(f"backbone.engine: the TFLite conversion of {backbone_id} differs from Keras "
                             f"by {difference:.3g} (> {TOLERANCE}); set backbone.engine: keras")
    log.info("TFLite engine matches Keras within %.2g", difference)
    return converted


def sees_gpu() -> bool:
    silence_tensorflow()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def default_threads() -> int:
    """Every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def select_engine(config: BackboneConfig, cache_dir: Path, backbone_id: str,
                  make_keras: Callable[[], KerasBackbone], cpu_engine: str) -> Backbone:
    """The engine `backbone.engine` asks for; `auto` is `cpu_engine` ("tflite" or "keras": the one measured
    faster for this backbone) on a CPU, Keras where TensorFlow sees a GPU or where the conversion fails. The
    Keras network is built only when it is needed."""
    build_keras = functools.cache(make_keras)  # built at most once, whichever way this goes
    engine = config.engine
    if engine == "auto":
        engine = "keras" if sees_gpu() else cpu_engine
    if engine == "keras":
        return build_keras()
    threads = config.threads or default_threads()
    if config.engine == "tflite":
        return tflite_backbone(build_keras, backbone_id, cache_dir, threads)
    try:
        return tflite_backbone(build_keras, backbone_id, cache_dir, threads)
    except EngineMismatch as exc:
        log.warning("%s; running the Keras engine", exc)
    except BackboneUnavailable:
        raise  # the weights themselves are missing: no engine can help
    except Exception:
        log.exception("the TFLite engine failed for %s; running the Keras engine", backbone_id)
    return build_keras()
