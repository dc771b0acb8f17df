"""The lean runtime, through the shipped path: `retraind run` and `retraind classify` as real processes
(`python -m daemon`, what the `retraind` script runs) with the shipped config.yaml (only the data root, the port
and the log level changed), the default backbone with its conversion cached.

Prints: process start → /healthz and → /readyz on a restart with a model (the real images of --data; and with
--n stored bottlenecks); the resident memory at rest with a model (after serving a few HTTP classify requests);
the peak resident memory of a daemon whose start trains on --n stored bottlenecks; `retraind classify FILE`
wall time; and, in this process, the bare forward pass of LiteRT against TensorFlow's `tf.lite.Interpreter` on
the same converted file (ratio, and the largest bottleneck difference).

With `--baseline DIR` (a checkout of another commit, e.g. `git archive 085598d | tar -x -C DIR`) the daemon
figures are measured for that code too, on the same data roots, in the same run.

Usage: python bench/lean.py [--n 10000] [--repeats 3] [--baseline DIR]"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import harness
import numpy as np
import restart
import yaml

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def write_config(root: Path, port: int) -> Path:
    """The shipped config.yaml with this data root and port (and warnings only in the log)."""
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["data_root"], raw["http"]["port"], raw["log_level"] = str(root), port, "WARNING"
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def http(url: str, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(url, data=data, timeout=30) as response:
            response.read()
            return int(response.status)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds `pid` has used so far (a machine's load stretches wall time, not these)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the peak so far) of `pid`, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


#: Python writes the bytecode of our modules as an installed package has it (pip compiles at install).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


class Daemon:
    """`python -m daemon run` of the code in `code` (a checkout), timed from the moment it is launched."""

    def __init__(self, code: Path, config: Path, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.launched = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config), "run"], cwd=code,
                                        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def until(self, path: str, timeout: float) -> float:
        """Seconds from launch until `path` answers 200."""
        def answered() -> bool:
            if self.process.poll() is not None:
                sys.exit(f"the daemon exited: {self.process.communicate()[1].decode()[-3000:]}")
            return http(self.base + path) == 200
        return harness.wait_until(answered, timeout, f"{path} to answer 200") - self.launched

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=120)
        if self.process.returncode:
            sys.exit(f"the daemon failed ({self.process.returncode}): {err.decode()[-3000:]}")


def restarts(code: Path, config: Path, port: int, repeats: int, samples: list[bytes]) -> dict[str, float]:
    """Median start → /healthz and → /readyz (wall, and CPU seconds used by then) over `repeats` restarts;
    memory at rest after the last one."""
    healthz, readyz, cpu = [], [], []
    for _ in range(repeats):
        daemon = Daemon(code, config, port)
        healthz.append(daemon.until("/healthz", 120))
        readyz.append(daemon.until("/readyz", 120))
        cpu.append(cpu_seconds(daemon.process.pid))
        daemon.stop()
    daemon = Daemon(code, config, port)
    daemon.until("/readyz", 120)
    for payload in samples:
        assert http(f"{daemon.base}/v1/models/retraind:classify", payload) == 200
    time.sleep(2.0)  # at rest
    rest = memory(daemon.process.pid)
    daemon.stop()
    return {"healthz": statistics.median(healthz), "readyz": statistics.median(readyz),
            "ready_cpu": statistics.median(cpu), "rss": rest["VmRSS"]}


def classify_wall(code: Path, config: Path, image: Path, repeats: int) -> tuple[float, float]:
    """Median wall seconds, and CPU seconds, of `retraind classify FILE`, process start to exit."""
    walls, cpus = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config), "classify", str(image)],
                                 cwd=code, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        walls.append(time.perf_counter() - started)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            sys.exit(f"retraind classify failed ({child.returncode})")
        cpus.append(usage.ru_utime + usage.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def training_peak(code: Path, root: Path, args: argparse.Namespace, port: int) -> dict[str, float]:
    """A daemon started on `args.n` stored bottlenecks and no model: it trains model 1 (its quiet period
    passes at once, nothing changes); the process's peak memory once the model is served."""
    daemon = Daemon(code, write_config(root, port), port)
    ready = daemon.until("/readyz", 600)
    peak = memory(daemon.process.pid)["VmHWM"]
    daemon.stop()
    return {"peak": peak, "first_ready": ready}


def forward(model: bytes, images: np.ndarray, repeats: int) -> dict[str, float]:
    """Images per second, one image per invoke, of LiteRT and of `tf.lite.Interpreter` on the same file and
    threads, alternated so that machine load hits both alike; and their largest bottleneck difference."""
    import warnings

    import tensorflow as tf

    from daemon.engines import default_threads
    from daemon.tflite_engine import TfliteBackbone

    threads = default_threads()
    litert = TfliteBackbone(model, "bench", threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf_interpreter = tf.lite.Interpreter(model_content=model, num_threads=threads)
    tf_interpreter.allocate_tensors()
    (pixels,), (features,) = tf_interpreter.get_input_details(), tf_interpreter.get_output_details()

    def tf_embed() -> np.ndarray:
        out = np.empty((len(images), litert.dim), dtype=np.float32)
        for row, image in enumerate(images):
            tf_interpreter.set_tensor(pixels["index"], image[None])
            tf_interpreter.invoke()
            out[row] = tf_interpreter.get_tensor(features["index"])[0]
        return out

    difference = float(np.max(np.abs(litert.embed(images) - tf_embed())))
    rates: dict[str, list[float]] = {"litert": [], "tf": []}
    for _ in range(repeats):
        rates["litert"].append(harness.rate(lambda: litert.embed(images), len(images), 1))
        rates["tf"].append(harness.rate(tf_embed, len(images), 1))
    return {"litert": statistics.median(rates["litert"]), "tf": statistics.median(rates["tf"]),
            "difference": difference}


def measure_code(name: str, code: Path, real_root: Path, stored_root: Path, args: argparse.Namespace,
                 samples: list[bytes], image: Path) -> None:
    port = harness.free_port()
    config = write_config(real_root, port)
    got = restarts(code, config, port, args.repeats, samples)
    harness.emit(f"lean.{name}.start_to_healthz", got["healthz"], "s")
    harness.emit(f"lean.{name}.start_to_ready", got["readyz"], "s")
    harness.emit(f"lean.{name}.start_to_ready_cpu", got["ready_cpu"], "s")
    harness.emit(f"lean.{name}.rss_at_rest", got["rss"], "MiB")
    wall, cpu = classify_wall(code, config, image, args.repeats)
    harness.emit(f"lean.{name}.classify_file_wall", wall, "s")
    harness.emit(f"lean.{name}.classify_file_cpu", cpu, "s")
    stored = restarts(code, write_config(stored_root, port), port, 1, samples[:1])
    harness.emit(f"lean.{name}.start_to_ready_{args.n}_stored", stored["readyz"], "s")


def main() -> None:
    parser = harness.arguments(__doc__, n=10000, real=403, repeats=3, forward_images=64)
    parser.add_argument("--baseline", type=Path, help="another checkout whose daemon is measured alike")
    args = parser.parse_args()
    args.engine = "auto"
    harness.header("lean", backbone=args.backbone, stored=args.n, baseline=args.baseline or "none")
    from daemon.tflite_engine import cache_path

    (converted,) = harness.engines(args.backbone, args.cache, kinds=("tflite",)).values()  # converted once
    model = cache_path(args.cache, converted.id).read_bytes()
    images = harness.real_images(args.data, args.real)
    with harness.scratch("lean-real") as real_root, harness.scratch("lean-stored") as stored_root:
        harness.write_classes(real_root, images)
        harness.daemon_config(real_root, args.cache, args.backbone)  # the converted backbone, shared
        port = harness.free_port()
        first = training_peak(REPO, real_root, args, port)  # model 1 on the real images
        harness.note(f"first start on {len(images)} real images, conversion cached: ready in "
                     f"{first['first_ready']:.2f} s")
        made = restart.setup(stored_root, args.n, args, publish=False)
        harness.note(f"setup: {args.n} files and bottlenecks for {made['backbone']}, no model")
        peak = training_peak(REPO, stored_root, args, port)
        harness.emit(f"lean.new.peak_training_{args.n}", peak["peak"], "MiB")
        samples, image = [payload for _, _, payload in images[:5]], real_root / "one.jpg"
        image.write_bytes(images[0][2])
        measure_code("new", REPO, real_root, stored_root, args, samples, image)
        if args.baseline:
            measure_code("baseline", args.baseline, real_root, stored_root, args, samples, image)
    bare = harness.decoded(images[: args.forward_images], converted.input_size)
    got = forward(model, bare, args.repeats)
    harness.emit("lean.forward_litert", got["litert"], "img/s", ratio=got["litert"] / got["tf"],
                 vs="tf.lite.Interpreter")
    harness.emit("lean.forward_tf_lite_interpreter", got["tf"], "img/s")
    harness.emit("lean.forward_max_difference", got["difference"], "abs")
    harness.note(f"targets: rss_at_rest <= 250 MiB, peak_training_{args.n} <= 400 MiB, start_to_healthz <= 1.0 s, "
                 "start_to_ready <= 1.5 s, classify_file_wall <= 1.0 s, forward ratio >= 1, difference <= 1e-5")


if __name__ == "__main__":
    main()
