"""Time to train and publish a head for N cached bottlenecks, and the peak memory it takes.

For each N, one subprocess fills a scratch store with N synthetic bottlenecks (a Gaussian mixture: one
cluster per label, non-negative like pooled ReLU features) and their catalog rows, and times
`Store.training_matrix` alone; a second, fresh subprocess builds a real App on that store (a stand-in
backbone that is never run), lets its trainer prepare as a daemon's trainer thread does in the quiet period
before a run (`Trainer.prepare`: the plugins import SciPy, and the training set is loaded and split; timed
apart as `prepare`, its memory counted in the peak), and times one `Trainer.train_once()`: fit, evaluate,
gate, publish (and the load again, had anything been committed since the preparation: nothing is here).
`train_publish` runs until the new version serves; `train_publish_pictures` also includes the plots drawn
after it; `train_publish_again` is a second run in the same process (up to 100k rows), prepared again first,
as a running daemon's later retrains go (SciPy, loaded at the first fit, already imported); `cpu` is the
process's CPU seconds until the new version serves (the work done, whatever the load; the load itself is in
`prepare` and `load_matrix`). Of `train_publish`, `fit` is the served head's fit
(metrics.json `hyperparameters.fit_seconds`) and `trust_fit` what the calibration, review and novelty
thresholds add after it (`trust.fit_seconds`: the out-of-fold heads, the calibrator, and waiting for the
novelty fits, which run beside the head's fit; daemon/trust.py); `trust_started` is the trust fit's wall time
from its start, beside the head's fit, to its end (`trust.started_seconds`). Peak memory is the growth of
the process's maximum resident size during the first run, set beside the raw float32 matrix (N × dim × 4
bytes).

Usage: python bench/retrain.py [--sizes 1000,10000,50000] [--dim 1280] [--labels 10] [--scratch DIR]"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

from daemon.config import BackboneConfig
from daemon.hookspecs import hookimpl
from daemon.store import ORIGINAL, Store

BACKBONE = "synthetic/v1"
#: up to this size, the training process retrains once more on the same store (`train_publish_again`)
AGAIN_UP_TO = 100_000


class SyntheticBackbone:
    """Stands in for a real network: every bottleneck is already stored, so `embed` is never called."""

    id, input_size = BACKBONE, (224, 224)

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, images: np.ndarray) -> np.ndarray:
        raise AssertionError("the retrain bench must not compute bottlenecks")


class SyntheticPlugin:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.published = self.cpu = 0.0

    @hookimpl(tryfirst=True)
    def retraind_on_model_published(self, version: object) -> None:
        self.published, self.cpu = time.perf_counter(), time.process_time()  # serving from here on; pictures after

    @hookimpl
    def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> SyntheticBackbone | None:
        return SyntheticBackbone(self.dim) if config.name == "synthetic" else None


def fill_store(root: Path, n: int, dim: int, labels: int) -> None:
    """N catalog rows and vectors, made and stored 50k at a time (1M rows would not fit in memory at once);
    the rows go in with plain SQL in one transaction (setup, not measured)."""
    rng = np.random.default_rng(n)
    centres = rng.gamma(2.0, 0.5, (labels, dim)).astype(np.float32)
    y = np.arange(n) % labels
    shas = [f"{i:064x}" for i in range(n)]
    store = Store(root / "state" / "store.sqlite")
    for start in range(0, n, 50_000):
        part = slice(start, min(n, start + 50_000))
        noise = rng.standard_normal((part.stop - part.start, dim), dtype=np.float32) * 0.8
        vectors = np.abs(centres[y[part]] + noise)
        store.put_bottlenecks(BACKBONE, ((sha, ORIGINAL, v) for sha, v in zip(shas[part], vectors)))
    store.close()
    rows = [(f"label{y[i]:02d}/img{i:07d}.jpg", f"label{y[i]:02d}", sha, 1000, 0, 1) for i, sha in enumerate(shas)]
    with sqlite3.connect(root / "state" / "store.sqlite") as db:
        db.executemany("INSERT INTO files (path, label, sha256, size, mtime_ns, ok) VALUES (?,?,?,?,?,?)", rows)


def setup(root: Path, n: int, dim: int, labels: int) -> dict[str, float]:
    fill_store(root, n, dim, labels)
    store = Store(root / "state" / "store.sqlite")
    started = time.perf_counter()
    entries, matrix = store.training_matrix(BACKBONE, dim)
    seconds = time.perf_counter() - started
    store.close()
    assert len(entries) == n and matrix.shape == (n, dim)
    return {"load_seconds": seconds}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Reset the kernel's peak-RSS mark (Linux: "5" into clear_refs); returns the resident size now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def train(root: Path, dim: int, cache: Path, again: bool) -> dict[str, Any]:
    from daemon.app import App

    config = harness.daemon_config(root, cache, "synthetic")
    plugin = SyntheticPlugin(dim)
    app = App(config, extra_plugins=(plugin,))
    before = reset_peak()
    prepared = time.perf_counter()
    app.trainer.prepare()  # what the trainer thread does in the quiet period before a daemon's first run
    prepare_seconds = time.perf_counter() - prepared
    started, cpu = time.perf_counter(), time.process_time()
    version = app.trainer.train_once()
    seconds = time.perf_counter() - started
    growth = _status_bytes("VmHWM") - before
    first, first_cpu = plugin.published - started, plugin.cpu - cpu
    again_seconds = None
    if version is not None and again:  # a daemon's later retrain: SciPy and the rest already loaded
        app.trainer.prepare()  # in the quiet period before it
        started = time.perf_counter()
        again_seconds = plugin.published - started if app.trainer.train_once() is not None else None
    app.stop()
    if version is None or (again and again_seconds is None):
        sys.exit("the training run published nothing (see the log)")
    m = version.metrics
    return {"seconds": first, "cpu_seconds": first_cpu, "again_seconds": again_seconds, "prepare_seconds": prepare_seconds,
            "with_pictures_seconds": seconds, "peak_growth_bytes": growth,
            "fit_seconds": m["hyperparameters"].get("fit_seconds"),
            "trust_seconds": m["trust"].get("fit_seconds"), "trust_started_seconds": m["trust"].get("started_seconds"),
            "until_metrics_seconds": m["training_seconds"],
            "head_bytes": (version.directory / "head.npz").stat().st_size, "version": version.number,
            "validation_accuracy": m["accuracy"].get("validation")}


def run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"bench child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = harness.arguments(__doc__, sizes="1000,10000,50000", dim=1280, labels=10)
    parser.add_argument("--scratch", type=Path, default=None,
                        help="make the scratch store under this folder (e.g. /dev/shm; 1M rows take ~9 GiB)")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, root = args.child[0], Path(args.child[1])
        n = int(args.sizes)
        result = setup(root, n, args.dim, args.labels) if step == "setup" else train(root, args.dim, args.cache, n <= AGAIN_UP_TO)
        print(json.dumps(result))
        return
    harness.header("retrain", dim=args.dim, labels=args.labels, trainer="the configured head plugin (default L-BFGS)")
    for n in (int(s) for s in args.sizes.split(",")):
        with harness.scratch("retrain", args.scratch) as root:
            common = ["--sizes", str(n), "--dim", str(args.dim), "--labels", str(args.labels),
                      "--cache", str(args.cache)]
            loaded = run_child(*common, "--child", "setup", str(root))
            result = run_child(*common, "--child", "train", str(root))
        raw = n * args.dim * 4
        harness.emit(f"retrain.prepare_{n}", result["prepare_seconds"], "s")
        harness.emit(f"retrain.train_publish_{n}", result["seconds"], "s")
        if result["again_seconds"] is not None:
            harness.emit(f"retrain.train_publish_again_{n}", result["again_seconds"], "s")
        harness.emit(f"retrain.train_publish_pictures_{n}", result["with_pictures_seconds"], "s")
        harness.emit(f"retrain.fit_{n}", result["fit_seconds"] or float("nan"), "s", ratio=(result["fit_seconds"]
                     or float("nan")) / result["seconds"], vs=f"retrain.train_publish_{n}")
        harness.emit(f"retrain.trust_fit_{n}", result["trust_seconds"] or float("nan"), "s", ratio=(
                     result["trust_seconds"] or float("nan")) / result["seconds"], vs=f"retrain.train_publish_{n}")
        harness.emit(f"retrain.trust_started_{n}", result["trust_started_seconds"] or float("nan"), "s")
        harness.emit(f"retrain.cpu_{n}", result["cpu_seconds"], "s", ratio=result["cpu_seconds"] / result["seconds"],
                     vs=f"retrain.train_publish_{n}")
        harness.emit(f"retrain.gate_publish_{n}", result["seconds"] - result["until_metrics_seconds"], "s")
        harness.emit(f"retrain.load_matrix_{n}", loaded["load_seconds"], "s", ratio=loaded["load_seconds"] /
                     result["seconds"], vs=f"retrain.train_publish_{n}")
        harness.emit(f"retrain.peak_memory_{n}", result["peak_growth_bytes"] / 2**20, "MiB",
                     ratio=result["peak_growth_bytes"] / (raw + result["head_bytes"]), vs="raw float32 matrix + head")
        harness.note(f"N={n}: raw matrix {raw / 2**20:.1f} MiB, head file {result['head_bytes'] / 2**10:.0f} KiB, "
                     f"validation accuracy {result['validation_accuracy']}")


if __name__ == "__main__":
    main()
