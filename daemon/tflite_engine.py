"""The TFLite engine: a Keras backbone converted once by TensorFlow's converter, cached under the state dir,
and run by the LiteRT interpreter (`ai-edge-litert`, XNNPACK), so that serving never imports TensorFlow.

A cached conversion is two files: `<name>.tflite` and its manifest `<name>.json` (backbone id, cache format,
the flatbuffer's sha256 and size, the difference measured against Keras). The model is written first and the
manifest last, each atomically, so the manifest is the commit: a missing or stale manifest (another format or
backbone) means "convert again", and a flatbuffer whose sha256 differs from its manifest is damaged and is never
handed to the interpreter. The bytes that were hashed are the bytes the interpreter loads.

Measured on 2 cores, EfficientNet-Lite0, random uint8 input: the interpreter with 2 threads, one image per
`invoke`, 160-205 img/s against Keras batch 32 at 60-105 img/s. Both engines run the same graph
(`KerasBackbone.network`), and a conversion is kept only after its bottlenecks matched the Keras ones within
`TOLERANCE` on probe images; so both engines share one backbone id, and switching engines recomputes no cached
bottleneck and keeps the published model valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from daemon.atomic import write_atomic
from daemon.backbone import UNVERSIONED, Backbone, BackboneUnavailable, network_of
from daemon.keras_engine import KerasBackbone

log = logging.getLogger(__name__)

#: Interpreters a batch runs on at most (each holds its own copy of the packed weights)
LANES = 2
#: The largest difference in any bottleneck value allowed between the engines. Measured: 1.5e-5 for Lite0 over
#: the 403 tuxpaint6 images (values up to 5.8), 4e-9 for Inception v3 with random weights.
TOLERANCE = 1e-4
#: Bumped when the conversion recipe changes: a cache written under another format is stale.
CACHE_FORMAT = 2
_PROBE_IMAGES = 4


class EngineMismatch(BackboneUnavailable):
    """The converted network does not give the Keras bottlenecks; it is not used (nor kept)."""


class TfliteBackbone:
    """A converted backbone run by LiteRT one image per `invoke` (measured faster than batches of 32 on 2 cores
    for Lite0, the same for Inception v3), behind a lock: an interpreter must not be entered by two threads.

    One image runs on an interpreter with `threads` threads (the lowest latency: HTTP's single requests, one
    inbox file). Several images run on `LANES` interpreters at once ("lanes", made at the first call with
    several images: +~21 MiB each for Lite0) that share the threads (on 2 cores: one each), each lane taking
    the next image when it is free, the caller's thread driving the first. XNNPACK's threads meet at a barrier
    after every operator, so one interpreter with 2 threads runs at the pace of whichever thread the scheduler
    set aside: beside a process using 28 % of one core, Lite0 fell from 170 to 101-111 img/s on 2 cores with
    2 threads, and to 146-162 img/s on two one-thread lanes (178 alone against 170; README "Engines"). In the
    daemon, decoding and filing are that other work. The bottlenecks are the same bits either way.

    `model` is the flatbuffer's bytes; raises ValueError or RuntimeError (LiteRT's errors) for a model it
    cannot load."""

    one_image_per_pass = True

    def __init__(self, model: bytes, backbone_id: str, threads: int) -> None:
        self._model = model
        self._interpreter = _Lane(model, threads)
        self.id = backbone_id
        self.input_size, self.dim = self._interpreter.input_size, self._interpreter.dim
        self.threads = threads
        self._lock = threading.Lock()
        self._lanes: list[_Lane] = []

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, height, width, 3) → float32 (N, dim); one `invoke` per image."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with self._lock:
            if len(images) == 1 or self.threads == 1:  # (one thread: a lane would be the same interpreter)
                self._interpreter.run(images, out)
                return out
            if not self._lanes:
                count = min(LANES, self.threads)
                self._lanes = [_Lane(self._model, self.threads // count + (lane < self.threads % count))
                               for lane in range(count)]
            rows = itertools.count()  # each lane takes the next image when it is free: none waits for another
            failed: list[BaseException] = []
            helping = [threading.Thread(target=lane.run, args=(images, out, rows, failed), name="retraind-engine-lane")
                       for lane in self._lanes[1:min(len(images), len(self._lanes))]]
            for thread in helping:  # started per call (~0.1 ms; a piece of 4 images takes ~25): nothing to stop
                thread.start()
            try:
                self._lanes[0].run(images, out, rows)
            finally:
                for thread in helping:
                    thread.join()
            if failed:  # a row that lane took is not filled: no half-made result
                raise failed[0]
        return out


class _Lane:
    """One LiteRT interpreter with `threads` threads, run one image per `invoke`; not thread-safe."""

    def __init__(self, model: bytes, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_content=model, num_threads=threads)
        self._interpreter.allocate_tensors()
        (pixels,) = self._interpreter.get_input_details()
        (features,) = self._interpreter.get_output_details()
        self._input, self._output = pixels["index"], features["index"]
        self.input_size = (int(pixels["shape"][2]), int(pixels["shape"][1]))
        self.dim = int(features["shape"][-1])

    def run(self, images: np.ndarray, out: np.ndarray, rows: Iterator[int] | None = None,
            failed: list[BaseException] | None = None) -> None:
        """Write the bottlenecks of `images` (N, height, width, 3) uint8 into the same rows of `out` (N, dim):
        every row, or the rows it takes from `rows` (shared with other lanes) until they pass N. Raises what
        LiteRT raises, or, given `failed`, appends it there (a lane on another thread) and stops."""
        try:
            for row in rows or itertools.count():
                if row >= len(images):
                    return
                self._interpreter.set_tensor(self._input, images[row][None])
                self._interpreter.invoke()
                out[row] = self._interpreter.get_tensor(self._output)[0]
        except Exception as error:
            if failed is None:
                raise
            failed.append(error)


def cache_path(cache_dir: Path, backbone_id: str) -> Path:
    """Where the converted network of `backbone_id` is kept, named by its network (`daemon.backbone.network_of`:
    the conversion does not depend on the preprocessing, so the ids of one network share it and a new
    preprocessing version converts nothing)."""
    return _named(cache_dir, network_of(backbone_id))


def legacy_cache_path(cache_dir: Path, backbone_id: str) -> Path:
    """Where a conversion of `backbone_id`'s network was kept before conversions were shared: named by the id of
    its first preprocessing version (`…/v1`), as an upgraded store has it."""
    return _named(cache_dir, f"{network_of(backbone_id)}/{UNVERSIONED}")


def _named(cache_dir: Path, key: str) -> Path:
    """A readable name plus a hash (ids hold slashes)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    return cache_dir / f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.tflite"


def manifest_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads(manifest_path(path).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def read_cached(path: Path, backbone_id: str) -> bytes | None:
    """The cached flatbuffer at `path` if its manifest says it is `backbone_id`'s network in this format and its
    bytes have the recorded sha256; None (with a log line saying why) when it is missing, stale or damaged."""
    manifest = _manifest(path)
    if manifest is None:
        if path.exists():
            log.warning("cached TFLite model %s has no readable manifest; converting again", path)
        return None
    if manifest.get("format") != CACHE_FORMAT or network_of(str(manifest.get("backbone"))) != network_of(backbone_id):
        log.info("cached TFLite model %s is stale (format %s of %s); converting again", path,
                 manifest.get("format"), manifest.get("backbone"))
        return None
    try:
        model = path.read_bytes()
    except OSError as exc:
        log.warning("cached TFLite model %s cannot be read (%s); converting again", path, exc)
        return None
    if hashlib.sha256(model).hexdigest() != manifest.get("sha256"):
        log.warning("cached TFLite model %s is damaged (its sha256 differs from %s); converting again", path,
                    manifest_path(path).name)
        return None
    return model


def write_cached(path: Path, backbone_id: str, model: bytes, difference: float) -> None:
    """Keep a checked conversion: the flatbuffer first, then the manifest that makes it valid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, model)
    manifest = {"backbone": backbone_id, "format": CACHE_FORMAT, "sha256": hashlib.sha256(model).hexdigest(),
                "bytes": len(model), "max_difference_vs_keras": difference}
    write_atomic(manifest_path(path), json.dumps(manifest, indent=2).encode())


def convert(network: Any) -> bytes:
    """The uint8 Keras `network` as a TFLite flatbuffer (float32 weights, no quantisation: features must not
    move). Imports TensorFlow."""
    import tensorflow as tf

    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints every captured variable while exporting
        return bytes(tf.lite.TFLiteConverter.from_keras_model(network).convert())


def engine_difference(a: Backbone, b: Backbone) -> float:
    """The largest bottleneck difference between two engines on seeded noise images."""
    width, height = a.input_size
    probe = np.random.default_rng(0).integers(0, 256, (_PROBE_IMAGES, height, width, 3), dtype=np.uint8)
    return float(np.max(np.abs(a.embed(probe) - b.embed(probe))))


def _convert_and_check(make_keras: Callable[[], KerasBackbone], backbone_id: str, path: Path,
                       threads: int) -> TfliteBackbone:
    """Build the Keras engine, convert it, check it against Keras and keep it: the one-time cost of a first
    start, told step by step in INFO lines (a terminal and the journal alike)."""
    started = time.monotonic()
    step = f"converting backbone {backbone_id} to TFLite (once; 20-60 s on 2 cores)"
    log.info("%s: building the Keras network", step)
    keras_backbone = make_keras()
    log.info("%s: converting", step)
    model = convert(keras_backbone.network)
    log.info("%s: checking against Keras", step)
    converted = TfliteBackbone(model, backbone_id, threads)
    difference = engine_difference(converted, keras_backbone)
    if not difference <= TOLERANCE:
        raise EngineMismatch(f"backbone.engine: the TFLite conversion of {backbone_id} differs from Keras "
                             f"by {difference:.3g} (> {TOLERANCE}); set backbone.engine: keras")
    write_cached(path, backbone_id, model, difference)
    log.info("%s: done in %.0f s; matches Keras within %.2g; kept in %s", step, time.monotonic() - started,
             difference, path)
    return converted


def _adopted(legacy: Path, path: Path, backbone_id: str) -> bytes | None:
    """The conversion an older retraind kept at `legacy`, kept again at `path` (read once, converted never)."""
    if legacy == path or not legacy.exists():
        return None
    model = read_cached(legacy, backbone_id)
    if model is not None:
        difference = float((_manifest(legacy) or {}).get("max_difference_vs_keras", 0.0))
        write_cached(path, backbone_id, model, difference)
    return model


def tflite_backbone(make_keras: Callable[[], KerasBackbone], backbone_id: str, cache_dir: Path,
                    threads: int) -> TfliteBackbone:
    """The cached conversion of `backbone_id` (no TensorFlow imported), or a new one made by `make_keras` (a
    `KerasBackbone` factory, called only here), converted, checked against Keras and kept."""
    path = cache_path(cache_dir, backbone_id)
    model = read_cached(path, backbone_id)
    if model is None:
        model = _adopted(legacy_cache_path(cache_dir, backbone_id), path, backbone_id)
    if model is not None:
        try:
            return TfliteBackbone(model, backbone_id, threads)
        except (ValueError, RuntimeError) as exc:  # what LiteRT raises for a model it cannot load
            log.warning("cached TFLite model %s cannot be loaded (%s); converting again", path, exc)
    return _convert_and_check(make_keras, backbone_id, path, threads)
