"""What the performance benches share: the output format, the machine facts they print first, real images made
unique, daemon configs on a scratch data root, and a cache of converted backbones kept between runs.

Every figure is one line, `name value unit [device]`, optionally followed by `ratio R vs OTHER`; lines that
start with `#` are facts about the run. `device` says where the figure was computed: `cpu`, or `gpu` where
TensorFlow sees one and the Keras engine runs there (the TFLite interpreter always runs on the CPU)."""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from daemon.engines import default_threads, sees_gpu
from daemon.keras_engine import silence_tensorflow

REPO = Path(__file__).resolve().parents[1]
#: the project's shared folder: beside the checkout, or beside a folder of worktrees
SHARED = next((p / "shared" for p in REPO.parents if (p / "shared" / "data").is_dir()), REPO.parent / "shared")
DEFAULT_DATA = SHARED / "data" / "tuxpaint6"
DEFAULT_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "retraind-bench-cache"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def arguments(doc: str | None, **defaults: Any) -> argparse.ArgumentParser:
    """The flags every bench has; `defaults` adds `--name value` flags of the default's type."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone.name (default %(default)s)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of <label>/<image> files")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="converted backbones and downloaded weights, kept between runs (%(default)s)")
    for name, value in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"(default {value})")
    return parser


def keras_device() -> str:
    return "gpu" if sees_gpu() else "cpu"


def header(bench: str, **facts: object) -> None:
    silence_tensorflow()
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    gpu = ",".join(gpus) if gpus else "none (every figure is a CPU figure)"
    cpus = default_threads()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# bench {bench}: python {platform.python_version()}, tensorflow {tf.__version__}, cpus {cpus}, "
          f"load {load}", flush=True)
    print(f"# tensorflow sees GPU: {gpu}", flush=True)
    if facts:
        print("# " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)


def emit(name: str, value: float, unit: str, device: str = "cpu", ratio: float | None = None,
         vs: str = "", target: str = "", met: bool | None = None) -> None:
    """One figure per line: `name value unit [device]`, then its ratio and its target (met / NOT met)."""
    text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    line = f"{name} {text} {unit} [{device}]"
    if ratio is not None:
        line += f" ratio {ratio:.3g} vs {vs}"
    if target:
        line += f"; target {target}: {'met' if met else 'NOT met'}"
    print(line, flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


def real_images(data: Path, count: int) -> list[tuple[str, str, bytes]]:
    """`count` (label, file name, bytes) from `data/<label>/`, repeated as often as needed; every repeat gets
    a distinct trailer after the image data (decoders ignore it), so its content hash, and so its
    bottleneck, is new."""
    found = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        sys.exit(f"no images under {data}; give --data DIR with <label>/<image> files")
    by_label: dict[str, list[Path]] = {}
    for path in found:
        by_label.setdefault(path.relative_to(data).parts[0], []).append(path)
    # labels interleaved, so that any first N holds every label
    originals = [p for group in itertools.zip_longest(*by_label.values()) for p in group if p is not None]
    out = []
    for i in range(count):
        path = originals[i % len(originals)]
        copy = i // len(originals)
        payload = path.read_bytes() + (f"\0retraind-bench-copy-{copy}".encode() if copy else b"")
        label = path.relative_to(data).parts[0]
        out.append((label, f"{path.stem}-{copy}{path.suffix}", payload))
    return out


def write_classes(root: Path, images: list[tuple[str, str, bytes]]) -> None:
    for label, name, payload in images:
        folder = root / "classes" / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(payload)


def daemon_config(root: Path, cache: Path, name: str, **sections: Any) -> Any:
    """A config on the scratch data root `root`, whose weights folder is the shared bench cache (converted
    backbones are kept between runs); the trainer waits unless a bench asks it to train."""
    from daemon.config import parse_config

    raw: dict[str, Any] = {
        "data_root": str(root),
        "backbone": {"name": name},
        "training": {"quiet_period_seconds": 86400},
        "watch": {"settle_seconds": 0, "rescan_interval_seconds": 0},
        "http": {"enabled": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    config = parse_config(raw, root)
    cache.mkdir(parents=True, exist_ok=True)
    weights = config.folder("state") / "weights"
    weights.parent.mkdir(parents=True, exist_ok=True)
    if not weights.exists():
        weights.symlink_to(cache, target_is_directory=True)
    return config


@contextmanager
def scratch(prefix: str, where: Path | None = None) -> Iterator[Path]:
    """A fresh folder under `where` (default: the temporary folder), removed afterwards."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix=f"retraind-bench-{prefix}-", dir=where))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def engines(backbone: str, cache: Path, kinds: tuple[str, ...] = ("keras", "tflite")) -> dict[str, Any]:
    """The Keras and the TFLite engine of one backbone, built through the real plugin hook."""
    from daemon.engines import build_backbone
    from daemon.plugin_manager import Hooks, make_plugin_manager

    hooks = Hooks(make_plugin_manager())
    out = {}
    with scratch("engines") as root:
        for engine in kinds:
            started = time.perf_counter()
            out[engine] = build_backbone(hooks, daemon_config(root, cache, backbone, backbone={"engine": engine}))
            emit(f"build.{engine}", time.perf_counter() - started, "s", "cpu")
    return out


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rate(work: Callable[[], object], items: int, repeats: int) -> float:
    """Items per second: the median of `repeats` timed runs after one warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return items / statistics.median(times)


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.005) -> float:
    """Poll `condition`; returns the perf_counter time it first held (fails the bench after `timeout`)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if condition():
            return time.perf_counter()
        time.sleep(poll)
    sys.exit(f"timed out after {timeout}s waiting for {what}")


def decoded(images: list[tuple[str, str, bytes]], size: tuple[int, int]) -> np.ndarray:
    from daemon.backbone import PREPROCESSING
    from plugins.pillow_decoder import retraind_decode_image

    return np.stack([retraind_decode_image(payload, size, 10**9, PREPROCESSING) for _, _, payload in images])
