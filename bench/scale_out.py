"""Scale-out figures: `bulk embed` on a local Ray against the daemon's own fill of the same images, the rate of one
Ray worker (to size a cluster), `retraind import` of synthetic Parquet rows, and the publish latency from
promotion to the version visible in a TF Serving base path and a Triton model repository.

Everything goes through the shipped path: the shipped config's backbone (EfficientNet-Lite0, `engine: auto`) on
a scratch data root, `retraind bulk embed` / `retraind import` through `daemon.cli.main`, a real daemon (App).
A Ray job pays a start-up (actor processes importing TensorFlow and loading the engine) that a daemon pays once
at its own start: each bulk figure is measured at N and at 2N images, and the marginal rate N / (t(2N) - t(N))
is the steady rate; the start-up is reported apart (after one small job that starts Ray's worker pool).

Usage: python bench/scale_out.py [--n 806] [--rows 100000] [--publish-images 403]"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import extract
import harness
import numpy as np

from daemon.cli import main


def _bulk(images: list[tuple[str, str, bytes]], args: argparse.Namespace, workers: int) -> float:
    """Seconds for `retraind bulk embed` of `images` on the local Ray with `workers` actors."""
    with harness.scratch("bulk") as root:
        source = root / "archive"
        harness.write_classes(source, images)
        config = _config_file(root, args)
        started = time.perf_counter()
        code = main(["--config", str(config), "bulk", "embed", str(source / "classes"), "--out",
                     str(root / "parquet"), "--workers", str(workers)])
        seconds = time.perf_counter() - started
        if code:
            raise SystemExit(f"bulk embed failed ({code})")
        return seconds


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


def bulk_figures(args: argparse.Namespace) -> None:
    import ray

    images = harness.real_images(args.data, 2 * args.n)
    daemon_rate, _ = extract.fill(images[: args.n], "auto", args)
    harness.emit("scale.daemon_fill", daemon_rate, "img/s")
    ray.init(num_cpus=harness.default_threads(), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    try:
        _bulk(images[:16], args, harness.default_threads())  # Ray's first job also starts its worker pool
        for workers, name in ((harness.default_threads(), "bulk_embed"), (1, "bulk_embed_per_worker")):
            once, twice = _bulk(images[: args.n], args, workers), _bulk(images, args, workers)
            steady = args.n / (twice - once)
            harness.note(f"{name}: {args.n} images in {once:.1f} s, {2 * args.n} in {twice:.1f} s "
                         f"({workers} workers); start-up about {once - args.n / steady:.1f} s")
            harness.emit(f"scale.{name}_end_to_end_{2 * args.n}", 2 * args.n / twice, "img/s",
                         ratio=2 * args.n / twice / daemon_rate, vs="the daemon's fill")
            harness.emit(f"scale.{name}", steady, "img/s", ratio=steady / daemon_rate, vs="the daemon's fill")
    finally:
        ray.shutdown()


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
    args = harness.arguments(__doc__, n=806, rows=100_000, publish_images=403, batch=32,
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
