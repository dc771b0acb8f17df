"""Start to ready with N bottlenecks stored, and proof that nothing is recomputed or retrained.

A setup process writes N small real image files under classes/ (6 labels; one PNG plus a distinct trailer
each), builds the real backbone, stores their catalog rows and one bottleneck each for that backbone's id
(synthetic vectors: only their presence matters here) as the daemon's scan and cache would have left them,
and publishes a model trained on them. Then a fresh process starts the daemon on that data root as
`retraind run` would, timing: imports, App construction (mostly loading the backbone), `start()` (the last
model served: ready), and until the pipeline is idle (the reconcile scan of N files, in the background,
found nothing to do), with the process's peak resident size at both. It then waits past the quiet period
and checks the counters: no bottleneck computed, no training run, the store unchanged.

Usage: python bench/restart.py [--n 10000] [--scratch DIR] [--backbone efficientnet_lite0] [--engine auto]
(a million files: `--n 1000000 --scratch /dev/shm` keeps them and the ~5 GiB store in memory, ~10 GiB)"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import numpy as np

LABELS = ("animals", "food", "household", "plants", "town", "vehicles")
#: few L-BFGS iterations: the setup's model only has to exist. The restarted daemon has the same settings
#: (a head setting changed since a model was trained makes the daemon retrain it, rightly)
TRAINING = {"max_iterations": 20}


def images(n: int) -> Iterator[tuple[str, str, bytes]]:
    """N distinct small PNGs (6 labels) as (path under classes/, label, bytes). One 16×16 PNG of random pixels
    is encoded once; every file is it plus a distinct trailer after the image data (decoders ignore it), so
    each has its own content hash: a million files take a minute, not the half hour of one encode each."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
    image = buffer.getvalue()
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        yield f"{label}/img{i:07d}.png", label, image + f"\0retraind-bench-{i}".encode()


def write_files(classes: Path, n: int) -> list[tuple[int, int, int, int, str]]:
    """Write the N files; returns each one's `file_signature` as the daemon's scan records it, and its path."""
    for label in LABELS:
        (classes / label).mkdir(parents=True, exist_ok=True)
    signatures = []
    for rel, _, payload in images(n):
        fd = os.open(classes / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
        st = os.stat(classes / rel)
        signatures.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, rel))
    return signatures


def setup(root: Path, n: int, args: argparse.Namespace, publish: bool = True) -> dict[str, Any]:
    """N files under classes/ with their catalog rows and stored bottlenecks; and, if `publish`, model 1: the
    store the daemon would have left after caching them and training. The vectors go in through the daemon's
    own `Store.put_bottlenecks`, 50k per transaction in content-hash order (the table's key: appended, not
    scattered), the catalog rows in one transaction. The model is trained before the files are written and
    their signatures filled in (the model does not depend on them): a million files and their store take
    ~13 GiB on tmpfs, and the training matrix 5 GiB more, so they are not held at once."""
    from daemon.app import App
    from daemon.store import ORIGINAL

    seconds: dict[str, float] = {}
    config = harness.daemon_config(root, args.cache, args.backbone, backbone={"engine": args.engine},
                                   training=TRAINING)
    app = App(config)
    backbone = app.backbone
    started = time.perf_counter()
    rows = [(rel, label, hashlib.sha256(payload).hexdigest()) for rel, label, payload in images(n)]
    centres = np.random.default_rng(1).gamma(2.0, 0.5, (len(LABELS), backbone.dim)).astype(np.float32)
    rng = np.random.default_rng(2)
    order = sorted(range(n), key=lambda i: rows[i][2])
    for start in range(0, n, 50_000):  # 50k at a time: a million vectors at once would not fit in memory
        part = np.array(order[start : start + 50_000])
        noise = rng.standard_normal((len(part), backbone.dim), dtype=np.float32) * 0.8
        vectors = np.abs(centres[part % len(LABELS)] + noise)
        app.store.put_bottlenecks(backbone.id, ((rows[i][2], ORIGINAL, v) for i, v in zip(part, vectors)))
    seconds["bottlenecks"] = time.perf_counter() - started
    with contextlib.closing(sqlite3.connect(config.folder("state") / "store.sqlite")) as db, db:  # one transaction
        db.executemany("INSERT INTO files (path, label, sha256, size, mtime_ns, ctime_ns, inode, ok) "
                       "VALUES (?,?,?,0,0,0,0,1)", rows)
    started = time.perf_counter()
    version = app.trainer.train_once() if publish else None
    seconds["model"] = time.perf_counter() - started
    app.stop()
    assert version is not None or not publish, "the setup could not publish a model"
    started = time.perf_counter()
    signatures = write_files(config.folder("classes"), n)
    seconds["files"] = time.perf_counter() - started
    with contextlib.closing(sqlite3.connect(config.folder("state") / "store.sqlite")) as db, db:
        db.executemany("UPDATE files SET size = ?, mtime_ns = ?, ctime_ns = ?, inode = ? WHERE path = ?", signatures)
    return {"backbone": backbone.id, "version": version.number if version else None, "seconds": seconds}


def _status_mib(field: str) -> float:
    """A size from /proc/self/status (VmRSS, VmHWM: the peak resident size) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from daemon.app import App

    imported = time.time()
    config = harness.daemon_config(root, args.cache, args.backbone, backbone={"engine": args.engine},
                                   training={**TRAINING, "quiet_period_seconds": 0.3})
    app = App(config)
    built = time.time()
    stored = app.store.count_bottlenecks(app.backbone.id)
    with app:
        started = time.time()
        ready = app.serving.version is not None
        peak_at_ready = _status_mib("VmHWM")
        # the background scan stats every file: ~1 ms each is allowed, so a million files may take 17 minutes
        harness.wait_until(app.pipeline.idle.is_set, timeout=max(600.0, args.n / 1000), what="an idle pipeline",
                           poll=0.01)
        idle = time.time()
        time.sleep(config.training.quiet_period_seconds + 1.5)  # a retrain, if any, would start by now
        value = app.metrics.registry.get_sample_value
        result = {
            "imported_at": imported, "construct": built - imported, "start": started - built,
            "idle": idle - built, "ready_at": started, "ready": ready, "stored": stored,
            "peak_at_ready_mib": peak_at_ready, "peak_at_idle_mib": _status_mib("VmHWM"),
            "stored_after": app.store.count_bottlenecks(app.backbone.id),
            "computed": value("retraind_bottleneck_cache_misses_total"),
            "forward_calls": value("retraind_bottleneck_compute_seconds_count"),
            "training_runs": sum(value("retraind_training_runs_total", {"result": r}) or 0.0
                                 for r in ("promoted", "rejected", "failed")) + app.trainer.runs,
            "version": app.serving.version.number if app.serving.version else None,
            # what the trainer checks at start: false would mean a retrain is due (maybe under way, uncounted)
            "current": app.serving.version is not None and app.trainer.trained_on_current(app.serving.version),
            "engine": type(app.backbone).__name__,
        }
    return result


def filesystem_type(path: Path) -> str:
    """The type of the file system `path` is on, as `stat -f` names it (tmpfs, ext2/ext3, ...)."""
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=False).stdout.strip() or "unknown"


def child(*args: str) -> dict[str, Any]:
    """Run a step in a fresh process; `launched` is when it was started (wall clock, as the child reports)."""
    launched = time.time()
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"bench child {args} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "launched": launched}


def main() -> None:
    parser = harness.arguments(__doc__, n=10000, engine="auto")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="make the data root under this folder (e.g. /dev/shm for a million files)")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, root = args.child[0], Path(args.child[1])
        print(json.dumps(setup(root, args.n, args) if step == "setup" else measure(root, args)))
        return
    harness.header("restart", backbone=args.backbone, engine=args.engine, stored=args.n)
    common = ["--n", str(args.n), "--backbone", args.backbone, "--engine", args.engine, "--cache", str(args.cache)]
    with harness.scratch("restart", args.scratch) as root:
        made = child(*common, "--child", "setup", str(root))
        took = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in made["seconds"].items())
        harness.note(f"setup: {args.n} files and bottlenecks for {made['backbone']}, model {made['version']} "
                     f"({took}); data root {root} on {filesystem_type(root)}")
        got = child(*common, "--child", "measure", str(root))
    harness.emit("restart.interpreter_and_imports", got["imported_at"] - got["launched"], "s")
    harness.emit("restart.construct", got["construct"], "s")
    harness.emit("restart.start_to_ready", got["start"], "s")
    harness.emit("restart.start_to_idle", got["idle"], "s")
    harness.emit("restart.scan_after_ready", got["idle"] - got["start"], "s")
    harness.emit("restart.peak_rss_at_ready", got["peak_at_ready_mib"], "MiB")
    harness.emit("restart.peak_rss_at_idle", got["peak_at_idle_mib"], "MiB")
    harness.emit("restart.process_to_ready", got["ready_at"] - got["launched"], "s")
    harness.emit("restart.recomputed_bottlenecks", got["computed"] or 0.0, "count")
    harness.emit("restart.forward_calls", got["forward_calls"] or 0.0, "count")
    harness.emit("restart.training_runs", got["training_runs"], "count")
    proof = (got["ready"] and got["current"] and not got["computed"] and not got["forward_calls"]
             and not got["training_runs"]
             and got["stored"] == got["stored_after"] == args.n and got["version"] == made["version"])
    verdict = (f"PROOF: model {got['version']} served, nothing recomputed or retrained" if proof
               else "FAILED: see the counts above")
    harness.note(f"engine {got['engine']}; construct = importing the backbone's framework and loading it; {verdict}")
    if not proof:
        sys.exit(1)


if __name__ == "__main__":
    main()
