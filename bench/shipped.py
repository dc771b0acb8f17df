"""The daemon as users run it: a real `retraind run` process with the shipped `config.yaml` (only `data_root`
and `http.port` changed), files delivered as users deliver them, timed against the bare engine in this run.

Phases, one daemon process throughout (figures read from its own `/metrics` and from the folders it writes):
  fill      N distinct small images copied in place (write + close) into classes/ → every bottleneck computed
  burst     M new images written beside the data root, then renamed into inbox/ → every one classified
  backfill  B new training images copied into classes/; meanwhile D single inbox files are renamed in, one
            every `--drop-every` seconds from 1 s on → each one's latency to its result record
  photos    P phone photos (12 MP JPEGs made by ../shared/tools/photos.py from tuxpaint6, kept in $TMPDIR)
            copied into classes/ → every bottleneck computed
The bare engine (the same backbone and engine `auto` picks, every core, batch 32, pre-decoded images) runs in
this process while the daemon is idle, before each phase. The photo limit is measured here too: reading,
hashing and decoding each photo with the shipped decoder on one thread, spread over the cores, plus the bare
forward: 1 / (decode / cores + forward).

Usage: python bench/shipped.py [--fill 1612] [--burst 600] [--backfill 10000] [--drops 5] [--photos 120]
       [--port 9799] (run it under `flock /tmp/retraind-bench.lock`)"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import harness
import numpy as np

from daemon.engines import default_threads

PHOTOS_TOOL = harness.SHARED / "tools" / "photos.py"
_SAMPLE = re.compile(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$")


class Daemon:
    """`retraind run` in a subprocess on `root`, with the shipped config; its log goes to `root/daemon.log`."""

    def __init__(self, root: Path, port: int, cache: Path) -> None:
        self.root, self.port = root, port
        text = (harness.REPO / "config.yaml").read_text()
        text, one = re.subn(r"(?m)^data_root: \S+", f"data_root: {root / 'data'}", text)
        text, two = re.subn(r"(?m)^(  port: )\d+", rf"\g<1>{port}", text)
        if one != 1 or two != 1:
            sys.exit("config.yaml no longer has one `data_root:` and one `  port:` line to change")
        self.config = root / "config.yaml"
        self.config.write_text(text)
        weights = root / "data" / "state" / "weights"  # converted backbones kept between bench runs
        weights.parent.mkdir(parents=True)
        cache.mkdir(parents=True, exist_ok=True)
        weights.symlink_to(cache, target_is_directory=True)
        self.data = root / "data"
        self.log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
                                        stdout=self.log, stderr=subprocess.STDOUT, cwd=root)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def metric(self, name: str) -> float:
        """The sum of every sample of `name` (over all its labels) in `/metrics`."""
        if self.process.poll() is not None:
            self.fail("the daemon exited")
        total = 0.0
        for line in self.get("/metrics")[1].decode().splitlines():
            match = _SAMPLE.match(line)
            if match and match.group(1) == name:
                total += float(match.group(2))
        return total

    def fail(self, why: str) -> None:
        self.log.flush()
        tail = (self.root / "daemon.log").read_text(errors="replace")[-3000:]
        self.stop()
        sys.exit(f"{why}; the daemon's log ends:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) all of `pid`'s threads have used (`/proc/<pid>/stat`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_note(phase: str, before: float, after: float, items: int, seconds: float, bare_cpu: float) -> None:
    """The daemon's CPU per image during a phase against the limit's (the bare engine's; for photos plus
    reading, hashing and decoding one): the ratio the phase would reach with every core to itself, whatever
    else the machine ran meanwhile."""
    total = after - before
    harness.note(f"{phase}: the daemon used {1000 * total / items:.2f} ms of CPU per image ({total / seconds:.2f} "
                 f"cores), the limit {1000 * bare_cpu:.2f}: CPU ratio {bare_cpu * items / total:.3f}")


def wait_quiet(daemon: Daemon, timeout: float = 600) -> None:
    """Wait until the daemon has used under 5 % of a core for 2 s in a row (at least 4 s): a training run
    and its plots, started once the last phase's images were in, must not be timed with the next phase."""
    started = last = time.perf_counter()
    used = process_cpu(daemon.process.pid)
    quiet_since = started
    while time.perf_counter() - started < timeout:
        time.sleep(0.5)
        now, cpu = time.perf_counter(), process_cpu(daemon.process.pid)
        if cpu - used > 0.05 * (now - last):
            quiet_since = now
        used, last = cpu, now
        if now - quiet_since >= 2 and now - started >= 4:
            return
    daemon.fail(f"the daemon was still busy {timeout:.0f} s after the phase")


def wait_for(condition: object, timeout: float, what: str, daemon: Daemon, poll: float = 0.1,
             progress: object = None) -> float:
    """Poll `condition()`; a `# ...` progress line every 5 s from `progress()`; the time it first held."""
    deadline = started = time.perf_counter()
    deadline += timeout
    shown = started
    while time.perf_counter() < deadline:
        if daemon.process.poll() is not None:
            daemon.fail(f"the daemon exited while waiting for {what}")
        if condition():  # type: ignore[operator]
            return time.perf_counter()
        if progress is not None and time.perf_counter() - shown >= 5:
            shown = time.perf_counter()
            harness.note(f"  {what}: {progress()} ({shown - started:.0f} s)")  # type: ignore[operator]
        time.sleep(poll)
    daemon.fail(f"timed out after {timeout:.0f} s waiting for {what}")
    return 0.0


def wait_count(count: Callable[[], float], base: float, items: int, timeout: float, what: str,
               daemon: Daemon) -> float:
    """Wait until `count()` (a figure of `/metrics`) is `items` above `base`; the time it first was. Asked
    twice a second while more than 128 images are left, ten times a second down to the last 32, then every
    20 ms: each answer costs the daemon ~3 ms of CPU, and ten a second through a whole phase took 3 % of its
    CPU during the fill; but a half-second sleep begun with fewer images left than the daemon does in half a
    second (about 65-90 here) overshoots the phase's end by up to that half second."""
    started = shown = time.perf_counter()
    while time.perf_counter() - started < timeout:
        done = count() - base
        if done >= items:
            return time.perf_counter()
        if time.perf_counter() - shown >= 5:
            shown = time.perf_counter()
            harness.note(f"  {what}: {done:.0f}/{items} ({shown - started:.0f} s)")
        left = items - done
        time.sleep(0.5 if left > 128 else 0.1 if left > 32 else 0.02)
    daemon.fail(f"timed out after {timeout:.0f} s waiting for {what}")
    return 0.0


def stage(folder: Path, images: list[tuple[str, str, bytes]]) -> list[tuple[str, Path]]:
    """Write the images under `folder/<label>/` (outside the data root); returns (label, file) pairs."""
    out = []
    for label, name, payload in images:
        path = folder / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        out.append((label, path))
    return out


def copy_in(files: list[tuple[str, Path]], classes: Path) -> None:
    """Copy each file in place into classes/<label>/ (created, written, closed), as `cp` does."""
    for label, path in files:
        (classes / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, classes / label / path.name)


def bare_rate(backbone: object, images: np.ndarray, repeats: int = 3) -> tuple[float, float]:
    """The bare engine's img/s, and its CPU seconds per image (this process's, all threads)."""
    chunks = [images[i : i + 32] for i in range(0, len(images), 32)]
    cpu = time.process_time()
    rate = harness.rate(lambda: [backbone.embed(c) for c in chunks], len(images), repeats)  # type: ignore[attr-defined]
    return rate, (time.process_time() - cpu) / (len(images) * (repeats + 1))


def result_written(data: Path, name: str) -> bool:
    return any(data.glob(f"outbox/*/{name}.json")) or (data / "review" / f"{name}.json").exists()


def make_photos(count: int) -> list[Path]:
    """`count` phone photos from tuxpaint6 (count/6 per class), made once into $TMPDIR and kept there."""
    per_class = max(1, count // 6)
    out = harness.DEFAULT_CACHE.parent / f"retraind-bench-photos-{per_class}"
    if not (out / "done").exists():
        harness.note(f"making {per_class * 6} phone photos into {out} (once; about a second each)")
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, str(PHOTOS_TOOL), str(harness.DEFAULT_DATA), str(out), str(per_class)],
                       check=True, stdout=subprocess.DEVNULL)
        (out / "done").write_text("")
    return sorted(out.glob("*/*.jpg"))[:count]


def decode_seconds(photos: list[Path], size: tuple[int, int]) -> tuple[float, float]:
    """Median seconds to read, hash and decode one photo with the shipped decoder, on one thread, and the
    mean CPU seconds it took."""
    from daemon.backbone import PREPROCESSING
    from plugins.pillow_decoder import retraind_decode_image

    times = []
    cpu = time.process_time()
    for path in photos:
        started = time.perf_counter()
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        retraind_decode_image(data, size, 10**9, PREPROCESSING)
        times.append(time.perf_counter() - started)
    return statistics.median(times), (time.process_time() - cpu) / len(photos)


def main() -> None:
    args = harness.arguments(__doc__, fill=1612, burst=600, backfill=10000, drops=5, drop_every=2.0,
                             photos=120, port=9799).parse_args()
    cores = default_threads()
    harness.header("shipped", backbone="shipped config.yaml", cores=cores, fill=args.fill, burst=args.burst,
                   backfill=args.backfill, photos=args.photos)
    photos = make_photos(args.photos) if args.photos else []
    made = harness.real_images(args.data, args.fill + args.burst + args.backfill + args.drops)
    fill, burst = made[: args.fill], made[args.fill : args.fill + args.burst]
    backfill = made[args.fill + args.burst : args.fill + args.burst + args.backfill]
    drops = made[args.fill + args.burst + args.backfill :]
    bare = harness.engines("efficientnet_lite0", args.cache, ("auto",))["auto"]
    pixels = harness.decoded(made[:64], bare.input_size)
    with harness.scratch("shipped") as root:
        staged = {name: stage(root / "staging" / name, images)
                  for name, images in (("fill", fill), ("burst", burst), ("backfill", backfill), ("drops", drops))}
        daemon = Daemon(root, args.port, args.cache)
        try:
            run_phases(daemon, args, staged, photos, bare, pixels, cores)
        finally:
            daemon.stop()


def run_phases(daemon: Daemon, args: object, staged: dict[str, list[tuple[str, Path]]], photos: list[Path],
               bare: object, pixels: np.ndarray, cores: int) -> None:
    a = args  # argparse.Namespace
    data, classes, inbox = daemon.data, daemon.data / "classes", daemon.data / "inbox"
    started = time.perf_counter()
    wait_for(lambda: daemon.get("/healthz")[0] == 200, 300, "the daemon to answer", daemon)
    harness.emit("shipped.process_to_healthy", time.perf_counter() - started, "s")

    def computed() -> float:
        return daemon.metric("retraind_bottleneck_cache_misses_total")

    # -- fill ---------------------------------------------------------------------------------------------
    engine, bare_cpu = bare_rate(bare, pixels)
    harness.emit("shipped.bare_engine", engine, "img/s")
    forward = lambda: daemon.metric("retraind_bottleneck_compute_seconds_sum")
    base, started, forward_base = computed(), time.perf_counter(), forward()
    harness.note(f"daemon pid {daemon.process.pid}")
    cpu = process_cpu(daemon.process.pid)
    copy_in(staged["fill"], classes)
    done = wait_count(computed, base, a.fill, 1800, "the fill", daemon)
    rate = a.fill / (done - started)
    harness.emit("shipped.fill", rate, "img/s", ratio=rate / engine, vs="shipped.bare_engine")
    busy = forward() - forward_base
    harness.note(f"fill: the forward pass took {busy:.1f} s of {done - started:.1f} s ({a.fill / busy:.0f} img/s "
                 "while it ran)")
    cpu_note("fill", cpu, process_cpu(daemon.process.pid), a.fill, done - started, bare_cpu)
    wait_for(lambda: daemon.get("/readyz")[0] == 200, 600, "the first model", daemon, poll=0.25)
    runs = lambda: daemon.metric("retraind_training_runs_total")
    harness.note(f"first model after the fill; training runs so far: {runs():.0f}")
    wait_quiet(daemon)  # a follow-up training run and its plots finish: the burst is timed on an idle daemon

    # -- inbox burst --------------------------------------------------------------------------------------
    if a.burst:
        engine, bare_cpu = bare_rate(bare, pixels)
        harness.emit("shipped.bare_engine_before_burst", engine, "img/s")
        classified = lambda: daemon.metric("retraind_classifications_total")
        base, started, forward_base = classified(), time.perf_counter(), forward()
        cpu = process_cpu(daemon.process.pid)
        for _label, path in staged["burst"]:
            os.rename(path, inbox / path.name)
        done = wait_count(classified, base, a.burst, 1800, "the inbox burst", daemon)
        rate = a.burst / (done - started)
        harness.emit("shipped.inbox_burst", rate, "img/s", ratio=rate / engine, vs="shipped.bare_engine_before_burst")
        busy = forward() - forward_base
        harness.note(f"burst: the forward pass took {busy:.1f} s of {done - started:.1f} s ({a.burst / busy:.0f} img/s "
                     "while it ran)")
        cpu_note("burst", cpu, process_cpu(daemon.process.pid), a.burst, done - started, bare_cpu)

    # -- backfill with inbox files dropped meanwhile --------------------------------------------------------
    base, runs_before = computed(), runs()
    copier = threading.Thread(target=copy_in, args=(staged["backfill"], classes))
    started = time.perf_counter()
    copier.start()
    latencies = []
    for i, (_label, path) in enumerate(staged["drops"]):
        time.sleep(max(0.0, started + 1.0 + i * a.drop_every - time.perf_counter()))
        os.rename(path, inbox / path.name)
        dropped = time.perf_counter()
        at = wait_for(lambda p=path: result_written(data, p.name), 600, f"inbox file {i + 1} during the backfill",
                      daemon, poll=0.005, progress=lambda: f"backfill {computed() - base:.0f}/{a.backfill}")
        latencies.append(at - dropped)
        harness.note(f"  inbox file {i + 1} dropped at {dropped - started:.1f} s into the backfill: "
                     f"{latencies[-1] * 1000:.0f} ms to its result ({computed() - base:.0f} bottlenecks cached)")
    copier.join()
    done = wait_count(computed, base, a.backfill, 3600, "the backfill", daemon)
    if latencies:
        harness.emit("shipped.inbox_latency_during_backfill_max", max(latencies) * 1000, "ms")
        harness.emit("shipped.inbox_latency_during_backfill_median", statistics.median(latencies) * 1000, "ms")
    harness.emit("shipped.backfill", a.backfill / (done - started), "img/s")
    harness.emit("shipped.training_runs_during_backfill", runs() - runs_before, "count")

    # -- phone photos -------------------------------------------------------------------------------------
    if photos:
        wait_quiet(daemon)  # the training run after the backfill (11,000 images) and its plots
        engine, bare_cpu = bare_rate(bare, pixels)
        decode, decode_cpu = decode_seconds(photos[:20], bare.input_size)  # type: ignore[attr-defined]
        limit = 1 / (decode / cores + 1 / engine)
        harness.emit("shipped.bare_engine_before_photos", engine, "img/s")
        harness.emit("shipped.photo_decode_one_thread", decode * 1000, "ms")
        harness.emit("shipped.photo_limit", limit, "img/s")
        base, started = computed(), time.perf_counter()
        cpu = process_cpu(daemon.process.pid)
        copy_in([(p.parent.name, p) for p in photos], classes)
        done = wait_count(computed, base, len(photos), 1800, "the photos", daemon)
        rate = len(photos) / (done - started)
        harness.emit("shipped.photos", rate, "img/s", ratio=rate / limit, vs="shipped.photo_limit")
        cpu_note("photos", cpu, process_cpu(daemon.process.pid), len(photos), done - started, bare_cpu + decode_cpu)


if __name__ == "__main__":
    main()
