"""How a backbone's network runs: the `backbone.engine` choice (auto | keras | tflite), made here at the backbone
seam for every backbone plugin, and the warm-up forward before the daemon says it is ready.

`auto` runs, on a CPU, the engine the backbone's plugin measured faster (`cpu_engine`); where TensorFlow sees
a GPU it runs Keras, which uses it while the interpreter would stay on the CPU; and where the conversion
fails or does not match, Keras. TensorFlow is asked about GPUs only where a GPU driver's device node exists,
so on a CPU machine with the conversion cached nothing here imports TensorFlow.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from daemon.backbone import Backbone, BackboneUnavailable
from daemon.config import BackboneConfig, Config, ConfigError
from daemon.keras_engine import KerasBackbone, silence_tensorflow
from daemon.logs import foreign_output_as_debug
from daemon.tflite_engine import EngineMismatch, tflite_backbone

if TYPE_CHECKING:
    from daemon.plugin_manager import Hooks

log = logging.getLogger(__name__)

#: Device nodes of the GPU drivers TensorFlow can use (NVIDIA CUDA, AMD ROCm, WSL2's GPU bridge); with none of
#: them TensorFlow cannot see a GPU.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def build_backbone(hooks: Hooks, config: Config) -> Backbone:
    """The configured backbone, from the first plugin that provides it (weights and conversions cached under
    `state/weights`); ConfigError naming `backbone.name` when none does."""
    cache = config.folder("state") / "weights"
    cache.mkdir(parents=True, exist_ok=True)
    with foreign_output_as_debug():  # TensorFlow or LiteRT load here: their own chatter becomes DEBUG lines
        backbone = hooks.make_backbone(config.backbone, cache)
    if backbone is None:
        raise ConfigError(f"backbone.name: no plugin provides {config.backbone.name!r} "
                          "(built in: efficientnet_lite0, inception_v3)")
    return backbone


def gains_from_batches(backbone: Backbone) -> bool:
    """Whether a forward pass of N images costs less than N passes of one. Not for a backbone whose
    `one_image_per_pass` is true: the TFLite engine invokes its interpreter once per image (measured faster
    than batches on a CPU; daemon/tflite_engine.py)."""
    return not getattr(backbone, "one_image_per_pass", False)


def sees_gpu() -> bool:
    """Whether TensorFlow sees a GPU; TensorFlow is imported to ask only where a GPU driver is present."""
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return False
    silence_tensorflow()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def default_threads() -> int:
    """Every core this process may run on: the cores of its CPU affinity, at most the whole CPUs of its
    cgroup's quota (`cpu_quota`; at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return cores if quota is None else max(1, min(cores, math.floor(quota)))


def cpu_quota(cgroups: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs per period this process's cgroup may use (`docker run --cpus`, systemd's `CPUQuota=`): the
    smallest quota on its cgroup's path up to the root, from cgroup v2's `cpu.max` (`QUOTA PERIOD` or `max
    PERIOD`) or v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none), read as Go's automaxprocs and the JVM's
    container support read them. None when there is no quota or none can be read. A quota leaves the cores
    visible, so without it a 1-CPU container on 16 cores ran 16 engine threads, throttled."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2: one hierarchy for every controller
            quotas += _quotas(cgroups, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # v1: mounted under the controllers' names, or `cpu` alone
            for mount in dict.fromkeys((cgroups / controllers, cgroups / "cpu")):
                quotas += _quotas(mount, path, _v1_quota)
    return min(quotas, default=None)


def _quotas(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas set on `path` and each of its ancestors under `mount` (a container sees its own cgroup at
    the root)."""
    found, parts = [], [part for part in path.split("/") if part]
    for depth in range(len(parts), -1, -1):
        quota = read(mount.joinpath(*parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def select_engine(config: BackboneConfig, cache_dir: Path, backbone_id: str,
                  make_keras: Callable[[], KerasBackbone], cpu_engine: str) -> Backbone:
    """The engine `backbone.engine` asks for; `auto` is `cpu_engine` ("tflite" or "keras": the one measured
    faster for this backbone) on a CPU, Keras where TensorFlow sees a GPU or where the conversion fails. The
    Keras network is built only when it is needed (never when the conversion is cached)."""
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
    keras = build_keras()
    keras.fell_back_from = "tflite"  # the daemon counts it (retraind_internal_errors_total{where="engine_fallback"})
    return keras


def warm_up(backbone: Backbone, batch: int = 1) -> float:
    """One forward pass on `batch` black images, so the first real image (or batch of that size: the HTTP
    batcher's largest) does not pay for lazy set-up (XNNPACK's weight packing, a graph trace, buffers for the
    batch); returns its seconds."""
    width, height = backbone.input_size
    start = time.perf_counter()
    backbone.embed(np.zeros((batch, height, width, 3), dtype=np.uint8))
    seconds = time.perf_counter() - start
    log.debug("backbone %s warmed up in %.3f s", backbone.id, seconds)
    return seconds
