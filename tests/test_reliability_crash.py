"""kill -9 of a real daemon process (tests/crash_child.py) at random points during bulk caching, during
training and publishing, and during a burst of inbox files, many times over.

After every kill: the store passes SQLite's integrity check and every vector its CRC, every usable catalog file
has its vector, every published model version loads whole (its artifacts complete), `results.jsonl` holds no
file twice, and the process computed no vector the store already held when it started. After a final restart
that runs to the end: every inbox file is in exactly one final place with exactly one record, every training
image is cataloged, and the model serving was trained on all of them.

`RETRAIND_CRASH_ROUNDS` (default 5) sets the kills per scenario; `RETRAIND_CRASH_SEED` the random kill points.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from daemon.dataset import manifest_of
from daemon.registry import ModelRegistry
from daemon.scanner import walk_files
from daemon.store import Store
from tests.conftest import wait_for
from tests.crash_child import (
    EMBEDDED_LOG,
    EVENTS_LOG,
    PUBLISH_SECONDS,
    TRAIN_SECONDS,
    ColourGrid,
    vector_hash,
)
from tests.test_reliability_input import encoded, pixels

ROUNDS = int(os.environ.get("RETRAIND_CRASH_ROUNDS", "5"))
SEED = int(os.environ.get("RETRAIND_CRASH_SEED", str(time.time_ns() % 100_000)))
REPO = Path(__file__).resolve().parents[1]
LABELS = ("red", "blue", "grey")
CONFIG = """\
data_root: data
backbone: {name: colourgrid, batch_size: 8}
training: {quiet_period_seconds: 0.2}
watch: {settle_seconds: 0.1, rescan_interval_seconds: 0}
classify: {confidence_threshold: 0.0}
split: {validation_percentage: 20, testing_percentage: 0}
http: {enabled: false}
"""


def stored_vectors(data: Path) -> set[str]:
    path = data / "state" / "store.sqlite"
    if not path.exists():
        return set()
    with closing(sqlite3.connect(path, timeout=30)) as db:
        return {vector_hash(np.frombuffer(blob, np.float32)) for (blob,) in db.execute("SELECT vector FROM bottlenecks")}


def result_lines(data: Path) -> list[dict[str, object]]:
    path = data / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_state(data: Path) -> None:
    """What must hold after any kill: nothing corrupt, nothing half-published, nothing recorded twice."""
    with closing(sqlite3.connect(data / "state" / "store.sqlite", timeout=30)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        for blob, crc in db.execute("SELECT vector, crc FROM bottlenecks"):
            assert zlib.crc32(blob) == crc and len(blob) == 4 * ColourGrid.dim
        assert not db.execute("SELECT path FROM files f WHERE ok = 1 AND NOT EXISTS "
                              "(SELECT 1 FROM bottlenecks b WHERE b.sha256 = f.sha256)").fetchall()
    registry = ModelRegistry(data / "state" / "models", keep=5)
    for number in registry.versions():
        version = registry.load(number)
        assert (version.directory / "notes.txt").read_text().endswith(" or not at all\n")
    if (data / "state" / "models" / "CURRENT").exists():
        assert registry.current() is not None
    lines = result_lines(data)
    assert len({line["id"] for line in lines}) == len({line["sha256"] for line in lines}) == len(lines)


#: the vector of the all-black images an engine is warmed up with (with HTTP on, a batch of them)
WARM_UP = vector_hash(np.zeros(ColourGrid.dim, np.float32))


class Daemon:
    """The crash child: started, killed with SIGKILL or stopped with SIGTERM; every end is checked.
    `permissions_apply`: even run as root, file permissions stop it."""

    def __init__(self, root: Path, permissions_apply: bool = False) -> None:
        self.root, self.data, self.permissions_apply = root, root / "data", permissions_apply
        (root / "config.yaml").write_text(CONFIG)
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self._stored_before: set[str] = set()
        self._embedded_from = self._events_from = 0

    def events(self) -> list[str]:
        path = self.data / EVENTS_LOG
        return path.read_text().split()[self._events_from :] if path.exists() else []

    def _embedded(self) -> list[str]:
        path = self.data / EMBEDDED_LOG
        return path.read_text().split() if path.exists() else []

    def start(self, *options: str) -> None:
        """Start the child with `options` (tests/crash_child.py's flags)."""
        self._stored_before = stored_vectors(self.data)
        self._embedded_from = len(self._embedded())
        self._events_from += len(self.events())
        command = [sys.executable, "-m", "tests.crash_child", "config.yaml", *options]
        command += ["--permissions-apply"] if self.permissions_apply else []
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with (self.root / "child.log").open("ab") as log:
            process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.process = process
        wait_for(lambda: "ready" in self.events() or process.poll() is not None, what="the child to start")
        assert process.poll() is None, self.log_tail()

    def log_tail(self) -> str:
        return (self.root / "child.log").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        assert self.process is not None and self.process.poll() is None, self.log_tail()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.kills += 1
        self._check_ended()

    def killed_itself(self) -> None:
        """Wait for the child to reach its own kill point (SIGKILL), then check what it left."""
        assert self.process is not None
        wait_for(lambda: self.process is not None and self.process.poll() is not None, what="the kill point")
        assert self.process.returncode == -signal.SIGKILL, self.log_tail()
        self.kills += 1
        self._check_ended()

    def finish(self, settled: Callable[[], bool], *options: str) -> None:
        """Start (with `options`), let it work until `settled`, stop it cleanly."""
        self.start(*options)
        wait_for(settled, timeout=120, what="the restarted daemon to finish its work")
        self.stop()

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, self.log_tail()
        self._check_ended()

    def _check_ended(self) -> None:
        computed = [v for v in self._embedded()[self._embedded_from :] if v != WARM_UP]
        assert not set(computed) & self._stored_before, "a vector already stored was computed again"
        assert len(computed) == len(set(computed)), "a vector was computed twice in one run"
        check_state(self.data)


def add_images(folder: Path, names: list[str], colour: str, seed: int) -> dict[str, str]:
    """Write images with unique content; returns name -> sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    shas = {}
    for i, name in enumerate(names):
        content = encoded(pixels(colour, seed + i, (24, 24)), "PNG")
        (folder / name).write_bytes(content)
        shas[name] = hashlib.sha256(content).hexdigest()
    return shas


def add_training_images(data: Path, per_label: int, tag: str) -> None:
    for n, label in enumerate(LABELS):
        seed = int(hashlib.sha256(f"{tag}{label}".encode()).hexdigest()[:8], 16)
        add_images(data / "classes" / label, [f"{tag}-{i}.png" for i in range(per_label)], label, seed + n)


def trained_on_everything(data: Path) -> bool:
    """No inbox file and no open journal entry left; every training image cataloged; the model up to date."""
    if any(walk_files(data / "inbox")):
        return False
    store = Store(data / "state" / "store.sqlite")
    try:
        entries = sorted((e for e in store.catalog().values() if e.ok), key=lambda e: e.path)
        journal = store.journal_open()
        current = ModelRegistry(data / "state" / "models", keep=5).current()
    finally:
        store.close()
    images = sum(1 for _ in walk_files(data / "classes"))
    return (not journal and len(entries) == images and current is not None
            and current.metrics["manifest_sha256"] == manifest_of(entries))


def check_inbox_outcome(data: Path, dropped: dict[str, str], garbage: set[str]) -> None:
    """Every dropped file (name -> sha256) in exactly one final place with exactly one record."""
    places = collections.Counter(
        hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("outbox", "review", "rejected") for path in walk_files(data / folder)
        if not path.name.endswith(".json"))
    assert {name: places[sha] for name, sha in dropped.items()} == dict.fromkeys(dropped, 1)
    lines = {str(line["file"]): line for line in result_lines(data)}
    assert set(lines) == set(dropped) - garbage
    for name, line in lines.items():
        destination = Path(str(line["destination"]))
        assert line["sha256"] == dropped[name] and destination.exists()
        assert json.loads(destination.with_name(destination.name + ".json").read_text()) == line
    for name in garbage:
        assert json.loads((data / "rejected" / f"{name}.error.json").read_text())["reason"] == "unsupported"


def kill_at_random(daemon: Daemon, rng: random.Random, within: float) -> None:
    time.sleep(rng.uniform(0.0, within))  # a random kill point, not a synchronisation
    daemon.kill()


@pytest.fixture
def rng() -> random.Random:
    print(f"RETRAIND_CRASH_SEED={SEED}")
    return random.Random(SEED)


def test_kill_9_during_bulk_caching(tmp_path: Path, rng: random.Random) -> None:
    daemon = Daemon(tmp_path)
    partial = 0
    for round_ in range(ROUNDS):
        add_training_images(daemon.data, 40, f"bulk{round_}")
        before = len(stored_vectors(daemon.data))
        daemon.start()
        kill_at_random(daemon, rng, within=0.8)
        partial += 0 < len(stored_vectors(daemon.data)) - before < 40 * len(LABELS)
    daemon.finish(lambda: trained_on_everything(daemon.data))
    print(f"caching: {daemon.kills} kills, {partial} in the middle of a bulk load")
    assert len(stored_vectors(daemon.data)) == ROUNDS * 40 * len(LABELS)


def test_kill_9_during_training(tmp_path: Path, rng: random.Random) -> None:
    daemon = Daemon(tmp_path)
    models = daemon.data / "state" / "models"
    add_training_images(daemon.data, 15, "base")
    daemon.finish(lambda: trained_on_everything(daemon.data))
    landed: collections.Counter[str] = collections.Counter()
    for round_ in range(ROUNDS):
        add_training_images(daemon.data, 1, f"more{round_}")
        versions, leftovers = ModelRegistry(models, keep=5).versions(), set(models.glob(".retraind-tmp-*"))
        daemon.start()
        wait_for(lambda: "training" in daemon.events(), what="a training run to start")
        kill_at_random(daemon, rng, within=TRAIN_SECONDS + PUBLISH_SECONDS + 1.5)  # plots take a while
        half_published = bool(set(models.glob(".retraind-tmp-*")) - leftovers)
        published = ModelRegistry(models, keep=5).versions() != versions
        landed["after publishing" if published else "while publishing" if half_published else "in training"] += 1
    daemon.finish(lambda: trained_on_everything(daemon.data))
    current = ModelRegistry(models, keep=5).current()
    assert current is not None and current.labels == tuple(sorted(LABELS))
    print(f"training: {daemon.kills} kills ({dict(landed)}); model {current.number} serving")


def test_kill_9_during_inbox_burst(tmp_path: Path, rng: random.Random) -> None:
    daemon = Daemon(tmp_path)
    add_training_images(daemon.data, 10, "base")
    daemon.finish(lambda: trained_on_everything(daemon.data))
    dropped: dict[str, str] = {}
    garbage: set[str] = set()
    left: list[tuple[int, int]] = []  # after each kill: files still in the inbox, moves in the journal
    for round_ in range(ROUNDS):
        daemon.start()
        for n, label in enumerate(LABELS):
            names = [f"r{round_}-{label}-{i}.png" for i in range(10)]
            dropped |= add_images(daemon.data / "inbox", names, label, 10_000 * (round_ + 1) + 100 * n)
        name = f"r{round_}-garbage.jpg"
        (daemon.data / "inbox" / name).write_bytes(os.urandom(500))
        dropped[name] = hashlib.sha256((daemon.data / "inbox" / name).read_bytes()).hexdigest()
        garbage.add(name)
        kill_at_random(daemon, rng, within=0.5)
        with closing(sqlite3.connect(daemon.data / "state" / "store.sqlite")) as db:
            (journaled,) = db.execute("SELECT COUNT(*) FROM journal").fetchone()
        left.append((sum(1 for _ in walk_files(daemon.data / "inbox")), journaled))
    daemon.finish(lambda: trained_on_everything(daemon.data))
    check_inbox_outcome(daemon.data, dropped, garbage)
    print(f"inbox: {daemon.kills} kills, (inbox files, open journal entries) after each: {left}; "
          f"{len(dropped)} files, each in one place with one record")


def drop_inbox_files(data: Path, tag: str, per_label: int) -> dict[str, str]:
    dropped: dict[str, str] = {}
    for n, label in enumerate(LABELS):
        seed = int(hashlib.sha256(f"{tag}{label}".encode()).hexdigest()[:8], 16)
        dropped |= add_images(data / "inbox", [f"{tag}-{label}-{i}.png" for i in range(per_label)], label, seed + n)
    return dropped


def test_inbox_records_are_durable_before_their_journal_entries_close(tmp_path: Path) -> None:
    """A batch's records are fsynced together (daemon.atomic.GroupCommit), each while its journal entry is
    still open: a power cut before the entry closes is mended by recovery, never after."""
    daemon = Daemon(tmp_path)
    add_training_images(daemon.data, 10, "base")
    daemon.finish(lambda: trained_on_everything(daemon.data))
    dropped = drop_inbox_files(daemon.data, "durable", 4)
    daemon.finish(lambda: trained_on_everything(daemon.data), "--watch-fsync")  # no kill
    check_inbox_outcome(daemon.data, dropped, set())
    fsyncs = [line for line in (daemon.data / EVENTS_LOG).read_text().splitlines() if line.startswith("fsync ")]
    sidecars = [line.split() for line in fsyncs if not line.startswith("fsync results.jsonl ")]
    assert sorted(name for _, name, _ in sidecars) == sorted(f"{name}.json" for name in dropped)
    assert all(int(line.split()[2]) >= 1 for line in fsyncs), fsyncs  # every one before its entry closed


def test_kill_9_between_an_inbox_batch_s_records_and_its_journal_close(tmp_path: Path) -> None:
    """Kills at exact points of a batch of 8: between its sinks, and inside its group commit (after the first
    and after the last record's fsync). After a restart every file is in one place with one record."""
    daemon = Daemon(tmp_path)
    add_training_images(daemon.data, 10, "base")
    daemon.finish(lambda: trained_on_everything(daemon.data))
    dropped: dict[str, str] = {}
    for point in (("--kill-in-sink", "5"), ("--kill-at-fsync", "1"), ("--kill-at-fsync", "8")):
        daemon.start("--watch-fsync", *point)
        dropped |= drop_inbox_files(daemon.data, f"k{point[1]}{point[0][7]}", 3)
        daemon.killed_itself()
        with closing(sqlite3.connect(daemon.data / "state" / "store.sqlite")) as db:
            (journaled,) = db.execute("SELECT COUNT(*) FROM journal").fetchone()
        assert journaled, f"{point}: the kill landed before the batch was journaled or after it closed"
        daemon.finish(lambda: trained_on_everything(daemon.data))  # recovery, then the rest of the files
        check_inbox_outcome(daemon.data, dropped, set())


def free_port() -> int:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_kill_9_inside_a_review_decision_across_file_systems(tmp_path: Path) -> None:
    """review/ on another mount (a bind mount over itself: a move from it copies, then removes the original);
    kills between the copy and the removal, of a label decision and of its undo. After each restart the file is
    in one place: the interrupted move is finished, never done again to a second name."""
    from tests.test_reliability_disk import mount, unmount

    daemon = Daemon(tmp_path)
    port = free_port()
    (tmp_path / "config.yaml").write_text(CONFIG.replace("http: {enabled: false}", f"http: {{port: {port}}}")
                                          .replace("confidence_threshold: 0.0", "confidence_threshold: 1.0"))
    add_training_images(daemon.data, 10, "base")
    review, taught = daemon.data / "review", daemon.data / "classes" / "red"
    review.mkdir(parents=True)
    mount("--bind", str(review), str(review))
    try:
        daemon.start()
        add_images(daemon.data / "inbox", ["doubt.png"], "red", 4242)
        wait_for(lambda: (review / "doubt.png.json").exists(), what="the file in review/")
        daemon.stop()
        for decision in ("/v1/review/{id}:label", "/v1/review:undo"):
            daemon.start("--kill-at-unlink", "doubt.png")
            queue = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/review", timeout=10))
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}" + decision.format(id=queue["groups"][0][0]["id"] if queue["groups"] else ""),
                data=json.dumps({"label": "red", "group": True}).encode(), method="POST",
                headers={"Content-Type": "application/json"})
            with pytest.raises(OSError):  # the daemon is killed before it answers
                urllib.request.urlopen(request, timeout=10)
            daemon.killed_itself()
            assert (review / "doubt.png").exists() and (taught / "doubt.png").exists()  # the kill point
            daemon.start()
            wait_for(lambda: trained_on_everything(daemon.data), what="the restarted daemon to settle")
            daemon.stop()
            in_review = sorted(p.name for p in review.iterdir() if not p.name.endswith(".json"))
            in_classes = sorted(p.name for p in taught.glob("doubt*"))
            assert (in_review, in_classes) == (([], ["doubt.png"]) if decision.endswith(":label") else
                                               (["doubt.png"], [])), decision
    finally:
        unmount(review)
