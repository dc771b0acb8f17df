"""Scale-out figures: `bulk embed` on a local Ray against the daemon's own fill of the same images, the rate of one
Ray worker (to size a cluster), `retraind import` of synthetic Parquet rows, and the publish latency from
promotion to the version visible in a TF Serving base path and a Triton model repository.

Everything goes through the shipped path: the shipped config's backbone (EfficientNet-Lite0, `engine: auto`) on
a scratch data root, a real daemon (App) for the fill and for publishing, `retraind import` through
`daemon.cli.main`, and `retraind bulk embed` as a user runs it: a fresh `python -m daemon` process per job, which
starts its own local Ray (`ray.init()`) and stops it. The bulk set is `--n` images (tuxpaint6 repeated as
distinct files: each copy has a new content hash, so nothing is deduplicated).

A Ray job pays a fixed start-up the daemon pays once at its own start (Python and Ray start, actor processes
import Ray Data and load the engine, Ray stops at the end). Each worker count runs twice: on `--small` images
(almost all start-up) and on the whole set; the steady rate is the difference's rate, (n - small) / (t(n) -
t(small)), and the start-up is t(small) less the small set's share of the steady rate. The end-to-end rate, the
whole job's wall time included, is the one the target is about. One worker runs on a quarter of the set.

Usage: python bench/scale_out.py [--n 20150] [--small 64] [--rows 100000] [--publish-images 403]"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import extract
import harness
import numpy as np

from daemon.cli import main

#: `bulk embed` on the local Ray, end to end, against the daemon's fill of the same images
TARGET_RATIO = 0.8


def _bulk(source: Path, config: Path, out: Path, workers: int) -> tuple[float, str]:
    """Wall seconds of `retraind bulk embed source` in a fresh process (its own Ray) with `workers` actors, and
    the command's last line (its own seconds, of which Ray's start and stop)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "daemon", "--config", str(config), "bulk", "embed", str(source),
                           "--out", str(out), "--workers", str(workers)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"bulk embed failed ({done.returncode}): {done.stdout[-2000:]}")
    line = done.stdout.strip().splitlines()[-1]
    harness.note(line)
    return seconds, line


def _config_file(root: Path, args: argparse.Namespace, **sections: Any) -> Path:
    """The shipped defaults on a scratch root (converted engines from the bench cache), as a YAML file."""
    import dataclasses

    import yaml

    config = harness.daemon_config(root, args.cache, args.backbone, **sections)
    raw = dataclasses.asdict(config)
    raw["data_root"] = str(raw["data_root"])
    raw["plugins"] = {"disable": raw["plugins"]["disable"], **raw["plugins"]["settings"]}  # as a user writes it
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _verdict(ratio: float) -> str:
    return f"target >= {TARGET_RATIO}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'}"


def bulk_figures(args: argparse.Namespace) -> None:
    images = harness.real_images(args.data, args.n)
    daemon_rate, _ = extract.fill(images, "auto", args)
    harness.emit("scale.daemon_fill", daemon_rate, "img/s")
    with harness.scratch("bulk") as root:
        config = _config_file(root, args)
        sets = {"all": images, "quarter": images[: args.n // 4], "small": images[: args.small]}
        for name, chosen in sets.items():
            harness.write_classes(root / name, chosen)
        for workers, whole in ((harness.default_threads(), "all"), (1, "quarter")):
            small, line = _bulk(root / "small" / "classes", config, root / f"out-small-{workers}", workers)
            seconds, _ = _bulk(root / whole / "classes", config, root / f"out-{whole}-{workers}", workers)
            n = len(sets[whole])
            steady = (n - args.small) / (seconds - small)
            startup = small - args.small / steady
            label = "bulk_embed" if whole == "all" else "bulk_embed_per_worker"
            harness.note(f"{label}: {workers} workers, {args.small} images in {small:.1f} s, {n} in {seconds:.1f} s; "
                         f"fixed start-up about {startup:.1f} s")
            if whole == "all":
                ratio = n / seconds / daemon_rate
                harness.emit(f"scale.{label}_end_to_end_{n}", n / seconds, "img/s", ratio=ratio,
                             vs=f"the daemon's fill ({_verdict(ratio)})")
            harness.emit(f"scale.{label}", steady, "img/s", ratio=steady / daemon_rate, vs="the daemon's fill")
            harness.emit(f"scale.{label}_startup", startup, "s")
            inside = re.search(r"in ([\d.]+) s .*Ray's start ([\d.]+) s and stop ([\d.]+) s", line)
            if inside:  # the rest of the start-up: Python and imports, actors starting, Ray Data planning
                command, start, stop = map(float, inside.groups())
                harness.note(f"{label} start-up: ray.init {start:.1f} s, ray.shutdown {stop:.1f} s, Python and "
                             f"imports before Ray {small - command:.1f} s, the rest (actors, planning, the "
                             f"{args.small} images) {command - start - stop:.1f} s")


def import_figures(args: argparse.Namespace) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow.fs import LocalFileSystem

    from daemon.bulk import schema
    from daemon.bulk_manifest import Manifest
    from daemon.config import load_config
    from daemon.engines import build_backbone
    from daemon.plugin_manager import Hooks

    with harness.scratch("import") as root:
        config = _config_file(root, args)
        loaded = load_config(config)
        backbone = build_backbone(Hooks.of(loaded), loaded)
        rng = np.random.default_rng(0)
        folder = root / "parquet"
        folder.mkdir()
        parts: dict[str, int] = {}
        for part, start in enumerate(range(0, args.rows, 25_000)):
            rows = min(25_000, args.rows - start)
            vectors = rng.random((rows, backbone.dim), dtype=np.float32)
            shas = [f"{i:064x}" for i in range(start, start + rows)]
            table = pa.Table.from_arrays(
                [pa.array(shas), pa.array([backbone.id] * rows),
                 pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), backbone.dim),
                 pa.array([f"x/{s[-8:]}.jpg" for s in shas]), pa.array(["x"] * rows), pa.nulls(rows, pa.string())],
                schema=schema(backbone.dim))
            pq.write_table(table, folder / f"part-{part}.parquet")
            parts[f"part-{part}.parquet"] = rows
        Manifest(backbone.id, backbone.dim, parts).write(LocalFileSystem(), str(folder))  # as `bulk embed` ends
        for what in ("import", "import_again"):
            started = time.perf_counter()
            if main(["--config", str(config), "import", str(folder)]):
                raise SystemExit("import failed")
            seconds = time.perf_counter() - started
            harness.emit(f"scale.{what}_{args.rows}_seconds", seconds, "s")
            harness.emit(f"scale.{what}_rate", args.rows / seconds, "rows/s")


def publish_figures(args: argparse.Namespace) -> None:
    from daemon.app import App

    images = harness.real_images(args.data, args.publish_images)
    with harness.scratch("publish") as root:
        harness.write_classes(root, images)
        targets = {"tf_serving_base_path": str(root / "tf"), "triton_model_repository": str(root / "triton")}
        config = harness.daemon_config(root, args.cache, args.backbone, publish=targets,
                                       training={"quiet_period_seconds": 1})
        with App(config) as app:
            for number in (1, 2):
                if number == 2:  # a second promotion: the exporting network is built already
                    harness.write_classes(root, [(label, f"more-{name}", data) for label, name, data in images[:8]])
                version = _wait_version(app, number)
                promoted = time.perf_counter()
                for kind, inner in (("tf_serving", "tf/retraind/{n}/saved_model.pb"),
                                    ("triton", "triton/retraind/{n}/model.savedmodel/saved_model.pb")):
                    marker = root / inner.format(n=version.number)
                    seen = harness.wait_until(marker.is_file, timeout=600, what=f"model {version.number} in {kind}",
                                              poll=0.05)
                    harness.emit(f"scale.publish_{kind}_{'first' if number == 1 else 'next'}",
                                 seen - promoted, "s")


def _wait_version(app: Any, number: int) -> Any:
    harness.wait_until(lambda: app.serving.version is not None and app.serving.version.number >= number,
                       timeout=600, what=f"model {number}", poll=0.01)
    return app.serving.version


def main_bench() -> None:
    args = harness.arguments(__doc__, n=20_150, small=64, rows=100_000, publish_images=403, batch=32,
                             parts="bulk,import,publish").parse_args()
    harness.header("scale_out", backbone=args.backbone, images=args.n, rows=args.rows)
    parts = args.parts.split(",")
    if "bulk" in parts:
        bulk_figures(args)
    if "import" in parts:
        import_figures(args)
    if "publish" in parts:
        publish_figures(args)


if __name__ == "__main__":
    main_bench()
