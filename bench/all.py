"""Run every performance bench, each in its own process, echo their lines, and print the README's table: each
figure beside its target and its ratio against the seed's way on the same images and backbone.

Usage: python bench/all.py [--quick] [--backbone efficientnet_lite0] [--n 403]
(`--quick`: smaller N everywhere, for a smoke run; the README's figures come from a full run on an idle machine.)"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import harness

from daemon.engines import sees_gpu

BENCH = Path(__file__).resolve().parent


def run(script: str, *args: str) -> dict[str, tuple[float, str, str]]:
    """Run one bench; returns name → (value, unit, device), and echoes everything it printed."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, check=False)
    figures: dict[str, tuple[float, str, str]] = {}
    for line in out.stdout.splitlines():
        print(line, flush=True)
        parts = line.split()
        if len(parts) >= 4 and not line.startswith("#"):
            figures[parts[0]] = (float(parts[1]), parts[2], parts[3].strip("[]"))
    if out.returncode:
        print(f"# {script} FAILED ({out.returncode}):\n{out.stderr[-2000:]}", flush=True)
    print(f"# {script} took {time.perf_counter() - started:.0f} s", flush=True)
    return figures


def table(f: dict[str, tuple[float, str, str]], engine: str, sizes: list[int]) -> list[str]:
    def value(name: str) -> float:
        return f[name][0] if name in f else float("nan")

    def cell(name: str) -> str:
        return f"{f[name][0]:.4g} {f[name][1]} [{f[name][2]}]" if name in f else "n/a"

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}×" if math.isfinite(a / b if b else math.nan) else "n/a"

    best_bare = max(value("extract.bare_keras_b32"), value("extract.bare_tflite_b32"))
    fill, train = f"extract.fill_{engine}", f"extract.train_publish_{engine}"
    rows: list[tuple[str, str, str, str]] = [
        ("shipped path: fill of small images (`retraind run`, files copied in)", cell("shipped.fill"),
         "≥ 0.85× bare engine", ratio(value("shipped.fill"), value("shipped.bare_engine")) + " bare"),
        ("shipped path: inbox burst (files renamed in)", cell("shipped.inbox_burst"), "≥ 0.85× bare engine",
         ratio(value("shipped.inbox_burst"), value("shipped.bare_engine_before_burst")) + " bare"),
        ("shipped path: phone photos into classes/", cell("shipped.photos"), "≥ 0.8× decode + forward limit",
         ratio(value("shipped.photos"), value("shipped.photo_limit")) + " limit"),
        ("shipped path: inbox latency during a backfill (max)", cell("shipped.inbox_latency_during_backfill_max"),
         "≤ 1 s", ""),
        ("bare forward, Keras batch 32", cell("extract.bare_keras_b32"), "", ""),
        ("bare forward, TFLite (XNNPACK)", cell("extract.bare_tflite_b32"), "",
         ratio(value("extract.bare_tflite_b32"), value("extract.bare_keras_b32")) + " Keras"),
        (f"cache fill, real path ({engine})", cell(fill), "≥ 0.9× fastest bare, ≥ 10× seed",
         f"{ratio(value(fill), best_bare)} bare, {ratio(value(fill), value('seed.extract'))} seed"),
        ("seed's way: bottlenecks", cell("seed.extract"), "", ""),
        ("train + publish, same images", cell(train), "≥ 20× seed",
         ratio(value("seed.train_and_save"), value(train)) + " faster than seed"),
        ("seed's way: 300 SGD steps + save", cell("seed.train_and_save"), "", ""),
    ]
    for n in sizes:
        target = {10000: "< 2 s", 50000: "< 10 s"}.get(n, "")
        rows.append((f"retrain {n} bottlenecks", cell(f"retrain.train_publish_{n}"), target, ""))
        rows.append((f"retrain {n}: peak memory", cell(f"retrain.peak_memory_{n}"),
                     "≤ ~1.5× raw matrix + head", ""))
    rows += [
        ("inbox burst throughput", cell("inbox.burst_throughput"), "≥ 0.9× batched forward",
         ratio(value("inbox.burst_throughput"), value("inbox.batched_forward_b32")) + " batched"),
        ("inbox burst latency p50 / p95", f"{cell('inbox.burst_p50')} / {cell('inbox.burst_p95')}", "", ""),
        ("inbox trickle latency p50", cell("inbox.trickle_p50"), "≤ 1.3× single forward",
         ratio(value("inbox.trickle_p50"), value("inbox.single_forward")) + " single forward"),
        ("inbox trickle, back to back, p50", cell("inbox.trickle_back_to_back_p50"), "", ""),
        ("one image, seed's run_inference_on_image", cell("seed.run_inference_on_image"), "≥ 20× slower than ours",
         ratio(value("seed.run_inference_on_image"), value("inbox.trickle_p50")) + " our trickle p50"),
        ("restart: start() to ready", cell("restart.start_to_ready"), "< 3 s + model load", ""),
        ("restart: model load (construct)", cell("restart.construct"), "", ""),
        ("restart: recomputed / retrained",
         f"{cell('restart.recomputed_bottlenecks')} / {cell('restart.training_runs')}", "0 / 0", ""),
    ]
    lines = ["| figure | measured | target | ratio |", "|---|---|---|---|"]
    return lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]


def main() -> None:
    parser = harness.arguments(__doc__, n=403)
    parser.add_argument("--quick", action="store_true", help="small N everywhere: a smoke run")
    args = parser.parse_args()
    common = ["--backbone", args.backbone, "--data", str(args.data), "--cache", str(args.cache)]
    quick = args.quick
    sizes = [1000, 10000] if quick else [1000, 10000, 50000]
    harness.header("all", backbone=args.backbone, quick=quick)
    engine = "keras" if sees_gpu() else "tflite"  # what `backbone.engine: auto` picks for both built-ins
    figures: dict[str, tuple[float, str, str]] = {}
    n = str(100 if quick else args.n)
    for script, extra in (
        ("shipped.py", ["--fill", "200", "--burst", "100", "--backfill", "1000", "--drops", "2", "--photos", "12"]
         if quick else []),
        ("extract.py", ["--n", n]),
        ("seed_style.py", ["--n", n, "--inference-calls", "2" if quick else "3"]),
        ("retrain.py", ["--sizes", ",".join(map(str, sizes))]),
        ("inbox.py", ["--trickle", "10" if quick else "40", "--burst", "100" if quick else "500"]),
        ("restart.py", ["--n", "2000" if quick else "10000"]),
    ):
        figures.update(run(script, *common, *extra))
    print()
    print("\n".join(table(figures, engine, sizes)))


if __name__ == "__main__":
    main()
