"""Cache fill throughput through the daemon's real path, beside the bare forward of the same backbone.

A real daemon (App) starts on a scratch data root whose classes/ holds N real images (the tuxpaint6 set,
repeated with distinct bytes where N is larger): its start-up scan, pipeline worker and indexer read, hash,
decode, resize, embed and store every one. The fill time runs from `start()` until every vector and catalog
row is stored; backbone building is timed apart (`build.*`: the first TFLite build includes the one-off
conversion). In the same process both engines run bare on pre-decoded images, before and after the fills
(the better is kept). After each fill one training run on those bottlenecks is timed (train + gate +
publish), for the ratio against the seed's way on the same images (bench/seed_style.py).

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
    return rates


def fill(images: list[tuple[str, str, bytes]], engine: str, args: argparse.Namespace) -> tuple[float, str]:
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
            harness.note(f"fill with {kind}: {len(images)} images in {seconds:.2f} s, of which the forward pass "
                         f"{forward:.2f} s ({forward / seconds:.0%})")
            started = time.perf_counter()
            version = app.trainer.train_once()
            if version is not None:
                harness.emit(f"extract.train_publish_{engine}", time.perf_counter() - started, "s", "cpu")
                harness.note(f"model {version.number}: validation accuracy "
                             f"{version.metrics['accuracy'].get('validation')}")
        return throughput, device


def main() -> None:
    args = harness.arguments(__doc__, n=806, repeats=3, batch=32, bare_images=64, fill="keras,tflite").parse_args()
    images = harness.real_images(args.data, args.n)
    harness.header("extract", backbone=args.backbone, images=args.n, batch=args.batch)
    engines = harness.engines(args.backbone, args.cache)
    bare = harness.decoded(images[: args.bare_images], engines["keras"].input_size)
    before = bare_rates(engines, bare, args.batch, args.repeats)
    # The bare engines run before the fills and again after them; the better of the two is kept, so a busy
    # moment on a shared machine does not flatter the fill's ratio.
    fills = [e for e in args.fill.split(",") if e]
    throughputs = {engine: fill(images, engine, args) for engine in fills}
    after = bare_rates(engines, bare, args.batch, args.repeats)
    rates = {name: max(before[name], after[name]) for name in engines}
    for name, rate in rates.items():
        device = harness.keras_device() if name == "keras" else "cpu"
        harness.emit(f"extract.bare_{name}_b{args.batch}", rate, "img/s", device)
    harness.emit("extract.bare_tflite_vs_keras", rates["tflite"] / rates["keras"], "x", "cpu")
    best = max(rates.values())
    for engine, (throughput, device) in throughputs.items():
        harness.emit(f"extract.fill_{engine}", throughput, "img/s", device, throughput / best,
                     "the fastest bare engine")


if __name__ == "__main__":
    main()
