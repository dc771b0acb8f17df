"""Start to ready with N bottlenecks stored, and proof that nothing is recomputed or retrained.

A setup process writes N small real image files under classes/ (6 labels), builds the real backbone, stores
their catalog rows and one bottleneck each for that backbone's id (synthetic vectors: only their presence
matters here), and publishes a model trained on them. Then a fresh process starts the daemon on that data
root as `retraind run` would, timing: imports, App construction (mostly loading the backbone), `start()`
(the model served, the reconcile scan of N files), and until the pipeline is idle. It then waits past the
quiet period and checks the counters: no bottleneck computed, no training run, the store unchanged.

Usage: python bench/restart.py [--n 10000] [--backbone efficientnet_lite0] [--engine auto]"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

LABELS = ("animals", "food", "household", "plants", "town", "vehicles")


def write_images(classes: Path, n: int) -> list[tuple[str, str, str, int, int, int, int]]:
    """N distinct 16×16 PNGs; returns their catalog rows (path, label, sha256, size, mtime_ns, ctime_ns, inode)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
        path = classes / label / f"img{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        st = os.stat(path)
        rows.append((f"{label}/{path.name}", label, hashlib.sha256(buffer.getvalue()).hexdigest(), st.st_size,
                     st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return rows


def setup(root: Path, n: int, args: argparse.Namespace, publish: bool = True) -> dict[str, Any]:
    """N files under classes/ with their catalog rows and stored bottlenecks; and, if `publish`, model 1."""
    from daemon.app import App
    from daemon.store import ORIGINAL

    # few L-BFGS iterations: the setup's model only has to exist (hyper-parameters never trigger a retrain)
    config = harness.daemon_config(root, args.cache, args.backbone, backbone={"engine": args.engine},
                                   training={"max_iterations": 20})
    rows = write_images(config.folder("classes"), n)
    app = App(config)
    backbone = app.backbone
    centres = np.random.default_rng(1).gamma(2.0, 0.5, (len(LABELS), backbone.dim)).astype(np.float32)
    rng = np.random.default_rng(2)
    for start in range(0, n, 50_000):  # 50k at a time: a million vectors at once would not fit in memory
        part = rows[start : start + 50_000]
        noise = rng.standard_normal((len(part), backbone.dim), dtype=np.float32) * 0.8
        vectors = np.abs(centres[np.arange(start, start + len(part)) % len(LABELS)] + noise)
        app.store.put_bottlenecks(backbone.id, ((row[2], ORIGINAL, v) for row, v in zip(part, vectors)))
    with sqlite3.connect(config.folder("state") / "store.sqlite") as db:  # setup only: one transaction
        db.executemany("INSERT INTO files (path, label, sha256, size, mtime_ns, ctime_ns, inode, ok) "
                       "VALUES (?,?,?,?,?,?,?,1)", rows)
    version = app.trainer.train_once() if publish else None
    app.stop()
    assert version is not None or not publish, "the setup could not publish a model"
    return {"backbone": backbone.id, "version": version.number if version else None}


def measure(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from daemon.app import App

    imported = time.time()
    config = harness.daemon_config(root, args.cache, args.backbone, backbone={"engine": args.engine},
                                   training={"quiet_period_seconds": 0.3})
    app = App(config)
    built = time.time()
    stored = app.store.count_bottlenecks(app.backbone.id)
    with app:
        started = time.time()
        ready = app.serving.version is not None
        harness.wait_until(app.pipeline.idle.is_set, timeout=600, what="an idle pipeline", poll=0.01)
        idle = time.time()
        time.sleep(config.training.quiet_period_seconds + 1.5)  # a retrain, if any, would start by now
        value = app.metrics.registry.get_sample_value
        result = {
            "imported_at": imported, "construct": built - imported, "start": started - built,
            "idle": idle - built, "ready_at": started, "ready": ready, "stored": stored,
            "stored_after": app.store.count_bottlenecks(app.backbone.id),
            "computed": value("retraind_bottleneck_cache_misses_total"),
            "forward_calls": value("retraind_bottleneck_compute_seconds_count"),
            "training_runs": sum(value("retraind_training_runs_total", {"result": r}) or 0.0
                                 for r in ("promoted", "rejected", "failed")) + app.trainer.runs,
            "version": app.serving.version.number if app.serving.version else None,
            "engine": type(app.backbone).__name__,
        }
    return result


def child(*args: str) -> dict[str, Any]:
    """Run a step in a fresh process; `launched` is when it was started (wall clock, as the child reports)."""
    launched = time.time()
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"bench child {args} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "launched": launched}


def main() -> None:
    parser = harness.arguments(__doc__, n=10000, engine="auto")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, root = args.child[0], Path(args.child[1])
        print(json.dumps(setup(root, args.n, args) if step == "setup" else measure(root, args)))
        return
    harness.header("restart", backbone=args.backbone, engine=args.engine, stored=args.n)
    common = ["--n", str(args.n), "--backbone", args.backbone, "--engine", args.engine, "--cache", str(args.cache)]
    with harness.scratch("restart") as root:
        made = child(*common, "--child", "setup", str(root))
        harness.note(f"setup: {args.n} files and bottlenecks for {made['backbone']}, model {made['version']}")
        got = child(*common, "--child", "measure", str(root))
    harness.emit("restart.interpreter_and_imports", got["imported_at"] - got["launched"], "s")
    harness.emit("restart.construct", got["construct"], "s")
    harness.emit("restart.start_to_ready", got["start"], "s")
    harness.emit("restart.start_to_idle", got["idle"], "s")
    harness.emit("restart.process_to_ready", got["ready_at"] - got["launched"], "s")
    harness.emit("restart.recomputed_bottlenecks", got["computed"] or 0.0, "count")
    harness.emit("restart.forward_calls", got["forward_calls"] or 0.0, "count")
    harness.emit("restart.training_runs", got["training_runs"], "count")
    proof = (got["ready"] and not got["computed"] and not got["forward_calls"] and not got["training_runs"]
             and got["stored"] == got["stored_after"] == args.n and got["version"] == made["version"])
    verdict = (f"PROOF: model {got['version']} served, nothing recomputed or retrained" if proof
               else "FAILED: see the counts above")
    harness.note(f"engine {got['engine']}; construct = importing the backbone's framework and loading it; {verdict}")
    if not proof:
        sys.exit(1)


if __name__ == "__main__":
    main()
