"""Cache fill throughput through the daemon's real path, beside the bare forward of the same backbone.

A real daemon (App) starts on a scratch data root whose classes/ holds N real images (the tuxpaint6 set,
repeated with distinct bytes where N is larger): its start-up scan, pipeline worker and indexer read, hash,
decode, resize, embed and store every one. The fill time runs from `start()` to the N-th stored bottleneck;
backbone building is timed apart (`build.*`: the first TFLite build includes the one-off conversion). In the
same process, both engines run bare on pre-decoded images. Then one training run on those bottlenecks is
timed (train + gate + publish), for the ratio against the seed's way on the same images (bench/seed_style.py).

Usage: python bench/extract.py [--n 806] [--repeats 3] [--fill keras,tflite] [--backbone efficientnet_lite0]"""

from __future__ import annotations

import argparse
import time
from typing import Any

import harness
import numpy as np

from daemon.app import App


def bare_rates(engines: dict[str, Any], images: np.ndarray, batch: int, repeats: int) -> dict[str, float]:
    """Images per second of each engine's `embed` on pre-made uint8 batches of `batch`."""
    rates = {}
    for name, backbone in engines.items():
        chunks = [images[i : i + batch] for i in range(0, len(images), batch)]

        def run(backbone: Any = backbone, chunks: list[np.ndarray] = chunks) -> None:
            for chunk in chunks:
                backbone.embed(chunk)

        rates[name] = harness.rate(run, len(images), repeats)
        device = harness.keras_device() if name == "keras" else "cpu"
        harness.emit(f"extract.bare_{name}_b{batch}", rates[name], "img/s", device)
    return rates


def fill(images: list[tuple[str, str, bytes]], engine: str, args: argparse.Namespace, best_bare: float) -> float:
    """Fill a new store with `images` through a real daemon; done when every vector and catalog row is in."""
    with harness.scratch("extract") as root:
        harness.write_classes(root, images)
        config = harness.daemon_config(root, args.cache, args.backbone, backbone={"engine": engine, "batch_size": args.batch})
        app = App(config)
        kind = type(app.backbone).__name__
        device = harness.keras_device() if kind == "KerasBackbone" else "cpu"
        started = time.perf_counter()
        with app:
            done = harness.wait_until(
                lambda: app.pipeline.idle.is_set() and app.store.count_bottlenecks(app.backbone.id) >= len(images),
                timeout=3600, what="the cache fill", poll=0.02)
            seconds = done - started
            forward = app.metrics.registry.get_sample_value("retraind_bottleneck_compute_seconds_sum") or 0.0
            throughput = len(images) / seconds
            harness.emit(f"extract.fill_{engine}", throughput, "img/s", device, throughput / best_bare,
                         "the fastest bare engine")
            harness.note(f"fill with {kind}: {len(images)} images in {seconds:.2f} s, of which the forward pass "
                         f"{forward:.2f} s ({forward / seconds:.0%})")
            started = time.perf_counter()
            version = app.trainer.train_once()
            if version is not None:
                harness.emit(f"extract.train_publish_{engine}", time.perf_counter() - started, "s", "cpu")
                harness.note(f"model {version.number}: validation accuracy "
                             f"{version.metrics['accuracy'].get('validation')}")
        return throughput


def main() -> None:
    args = harness.arguments(__doc__, n=806, repeats=3, batch=32, bare_images=64, fill="keras,tflite").parse_args()
    images = harness.real_images(args.data, args.n)
    harness.header("extract", backbone=args.backbone, images=args.n, batch=args.batch)
    engines = harness.engines(args.backbone, args.cache)
    size = engines["keras"].input_size
    bare = harness.decoded(images[: args.bare_images], size)
    rates = bare_rates(engines, bare, args.batch, args.repeats)
    best = max(rates.values())
    harness.emit("extract.bare_tflite_vs_keras", rates["tflite"] / rates["keras"], "x", "cpu")
    del engines
    for engine in [e for e in args.fill.split(",") if e]:
        fill(images, engine, args, best)


if __name__ == "__main__":
    main()
