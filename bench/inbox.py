"""Inbox latency and throughput through a real daemon: from a file appearing in inbox/ to its result record.

A real App trains a first model on the real images (classes/), then images new to the store (real images made
unique) are renamed into inbox/ so they appear whole, as a careful writer would: a trickle (one at a time: half of them `--gap` seconds
after the last was recorded, half back to back) and a burst (all at once). A result counts as recorded when the daemon's own
sinks have written the sidecar and the `results.jsonl` line: a `trylast` sink plugin notes the time then.
Beside them: one bare forward pass (batch 1) and the batched forward of the engine the daemon runs.

Usage: python bench/inbox.py [--trickle 40] [--gap 0.6] [--burst 500] [--backbone efficientnet_lite0] [--engine auto]"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import harness
import numpy as np

from daemon.app import App
from daemon.config import Config
from daemon.hookspecs import hookimpl
from daemon.results import ClassificationResult


class Recorder:
    """A result sink that runs after the built-in ones and notes when each file's record was complete."""

    def __init__(self) -> None:
        self.done: dict[str, float] = {}
        self.changed = threading.Condition()

    @hookimpl(trylast=True)
    def retraind_on_result(self, result: ClassificationResult, config: Config) -> None:
        with self.changed:
            self.done[result.source.name] = time.perf_counter()
            self.changed.notify_all()

    def wait(self, names: set[str], timeout: float) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: names <= self.done.keys(), timeout):
                raise SystemExit(f"timed out: {len(names - self.done.keys())} inbox files never recorded")


def drop(staging: Path, inbox: Path, name: str, payload: bytes) -> float:
    """Write the file beside the inbox, then rename it in: it appears whole. Returns when it appeared."""
    (staging / name).write_bytes(payload)
    os.rename(staging / name, inbox / name)
    return time.perf_counter()


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered), ordered[round(0.95 * (len(ordered) - 1))]


def main() -> None:
    args = harness.arguments(__doc__, trickle=40, gap=0.6, burst=500, train_images=403, engine="auto",
                             repeats=5).parse_args()
    harness.header("inbox", backbone=args.backbone, engine=args.engine, trickle=args.trickle, burst=args.burst)
    training = harness.real_images(args.data, args.train_images)
    fresh = harness.real_images(args.data, args.train_images + args.trickle + args.burst)[args.train_images:]
    recorder = Recorder()
    with harness.scratch("inbox") as root:
        harness.write_classes(root, training)
        config = harness.daemon_config(root, args.cache, args.backbone, backbone={"engine": args.engine},
                                       training={"quiet_period_seconds": 0.5})
        with App(config, extra_plugins=(recorder,)) as app:
            device = harness.keras_device() if type(app.backbone).__name__ == "KerasBackbone" else "cpu"
            harness.note(f"engine {type(app.backbone).__name__}; waiting for the first model")
            harness.wait_until(lambda: app.serving.version, timeout=1800, what="the first model", poll=0.1)
            harness.wait_until(app.pipeline.idle.is_set, timeout=60, what="an idle pipeline", poll=0.05)
            width, height = app.backbone.input_size
            one = harness.decoded(fresh[:1], (width, height))
            batch = harness.decoded(fresh[:32], (width, height))
            single = 1 / harness.rate(lambda: app.extractor.embed(one), 1, args.repeats * 6)
            batched = harness.rate(lambda: app.extractor.embed(batch), 32, args.repeats)
            harness.emit("inbox.single_forward", single * 1000, "ms", device)
            harness.emit("inbox.batched_forward_b32", batched, "img/s", device)

            staging, inbox = root / "staging", config.folder("inbox")
            staging.mkdir()
            trickle = fresh[: args.trickle]
            for gap, label in ((args.gap, "trickle"), (0.0, "trickle_back_to_back")):
                latencies = []
                for _, name, payload in trickle[: len(trickle) // 2] if gap else trickle[len(trickle) // 2 :]:
                    time.sleep(gap)
                    appeared = drop(staging, inbox, name, payload)
                    recorder.wait({name}, timeout=60)
                    latencies.append(recorder.done[name] - appeared)
                p50, p95 = percentiles(latencies)
                harness.emit(f"inbox.{label}_p50", p50 * 1000, "ms", device, p50 / single, "inbox.single_forward")
                harness.emit(f"inbox.{label}_p95", p95 * 1000, "ms", device, p95 / single, "inbox.single_forward")

            burst = fresh[args.trickle :]
            for _, name, payload in burst:
                (staging / name).write_bytes(payload)
            appeared = {}
            for _, name, _ in burst:
                os.rename(staging / name, inbox / name)
                appeared[name] = time.perf_counter()
            recorder.wait(set(appeared), timeout=1800)
            latencies = [recorder.done[name] - t for name, t in appeared.items()]
            p50, p95 = percentiles(latencies)
            span = max(recorder.done[name] for name in appeared) - min(appeared.values())
            harness.emit("inbox.burst_p50", p50 * 1000, "ms", device)
            harness.emit("inbox.burst_p95", p95 * 1000, "ms", device)
            harness.emit("inbox.burst_throughput", len(burst) / span, "img/s", device,
                         len(burst) / span / batched, "inbox.batched_forward_b32")
            outcomes = app.metrics.registry.get_sample_value
            misses = outcomes("retraind_bottleneck_cache_misses_total") or 0.0
            harness.note(f"{len(burst) + len(trickle)} inbox files recorded; {misses:.0f} bottlenecks computed "
                         f"in all (training images included); mean latency in the burst "
                         f"{float(np.mean(latencies)) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
