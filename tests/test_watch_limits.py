"""The kernel's inotify limits reached (issue 11, row 7): a real daemon (tests/crash_child.py) in a user
namespace (`unshare -Ur`) whose own inotify limits (`/proc/sys/user/max_inotify_watches`, `..._instances`) are
set low, as on a busy host where other programs hold most of them. Only that namespace's limits change: the
host's `fs.inotify.*` (which `unshare -Ur`'s root could write too) are checked to stay as they were."""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from watchdog.events import FileSystemEvent

from daemon import watcher as watcher_module
from daemon.config import WatchConfig
from daemon.events import FileEvent
from daemon.inotify import InotifyObserver
from daemon.metrics import Metrics
from daemon.watcher import Watcher
from tests.conftest import wait_for, write_image
from tests.crash_child import EVENTS_LOG

REPO = Path(__file__).resolve().parents[1]
NOTICED = 20.0  # far below the periodic rescan (off here): an unwatched folder is otherwise never seen
SUBFOLDERS = 40


HOST_LIMITS = tuple(Path("/proc/sys/fs/inotify", name) for name in ("max_user_watches", "max_user_instances"))


def _namespace_limits_refused() -> str | None:
    try:
        done = subprocess.run(["unshare", "-Ur", "sh", "-c", "echo 20 > /proc/sys/user/max_inotify_watches"],
                              capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    if done.returncode != 0:
        return ("this kernel or sandbox does not let a user namespace set its own inotify limits (unshare -Ur, "
                f"Linux >= 5.11): {done.stderr.strip()}")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LimitedDaemon:
    """The crash child run under `unshare -Ur` with the given inotify limits, HTTP on a free loopback port."""

    def __init__(self, root: Path, watches: int, instances: int) -> None:
        self.root, self.data, self.port = root, root / "data", _free_port()
        (root / "config.yaml").write_text(
            "data_root: data\nbackbone: {name: colourgrid, batch_size: 8}\ntraining: {quiet_period_seconds: 0.2}\n"
            "watch: {settle_seconds: 0.1, rescan_interval_seconds: 0, poll_interval_seconds: 0.2}\n"
            "classify: {confidence_threshold: 0.0}\nsplit: {validation_percentage: 20, testing_percentage: 0}\n"
            f"http: {{port: {self.port}}}\n")
        limits = (f"echo {watches} > /proc/sys/user/max_inotify_watches && "
                  f"echo {instances} > /proc/sys/user/max_inotify_instances && ")
        command = ["unshare", "-Ur", "sh", "-c", limits + 'exec "$0" -m tests.crash_child config.yaml',
                   sys.executable]
        with (root / "child.log").open("wb") as log:
            self.process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONPATH": str(REPO)})
        events = self.data / EVENTS_LOG
        wait_for(lambda: (events.exists() and "ready" in events.read_text()) or self.process.poll() is not None,
                 what="the daemon to start")
        assert self.process.poll() is None, self.log()

    def log(self) -> str:
        return (self.root / "child.log").read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == name and s.labels == labels)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[type[LimitedDaemon]]:
    host = [path.read_text() for path in HOST_LIMITS]
    refused = _namespace_limits_refused()
    assert [path.read_text() for path in HOST_LIMITS] == host, "the host's inotify limits changed"
    if refused:
        pytest.skip(refused)
    for label, colour in (("red", "red"), ("blue", "blue")):
        for i in range(4):
            write_image(tmp_path / "data" / "classes" / label / f"{label}-{i}.jpg", colour, seed=i)
    started: list[LimitedDaemon] = []

    class Started(LimitedDaemon):
        def __init__(self, root: Path, watches: int, instances: int) -> None:
            super().__init__(root, watches, instances)
            started.append(self)

    yield Started
    for daemon in started:
        daemon.stop()
    assert [path.read_text() for path in HOST_LIMITS] == host, "the host's inotify limits changed"


def _classified(data: Path) -> int:
    path = data / "results.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_folders_beyond_the_watch_limit_are_said_counted_and_polled(tmp_path: Path,
                                                                    limited: type[LimitedDaemon]) -> None:
    """KIND: a folder inotify cannot watch because `fs.inotify.max_user_watches` is reached is an error line
    naming the sysctl and a count in `retraind_watch_errors_total{reason="watch_limit"}`, and that folder is
    polled instead: its files are still classified, without waiting for the periodic rescan. INPUT: a limit of
    20 watches, then 40 new sub-folders of inbox/ with an image each."""
    daemon = limited(tmp_path, watches=20, instances=128)
    wait_for(lambda: (daemon.data / "state" / "models" / "CURRENT").exists(), what="a first model")
    for i in range(SUBFOLDERS):
        write_image(daemon.data / "inbox" / f"batch-{i:02d}" / "photo.jpg", "red" if i % 2 else "blue", seed=50 + i)
    wait_for(lambda: _classified(daemon.data) == SUBFOLDERS, timeout=NOTICED,
             what=f"all {SUBFOLDERS} images classified:\n{daemon.log()[-2000:]}")
    assert daemon.metric("retraind_watch_errors_total", reason="watch_limit") >= 1
    daemon.stop()
    lines = [line for line in daemon.log().splitlines() if "ERROR" in line]
    assert lines and all("cannot watch" in line and "watch limit is reached (20 watches for this user)" in line
                         and "sysctl -w fs.inotify.max_user_watches=" in line for line in lines), lines
    assert "Traceback" not in daemon.log()


def test_no_inotify_instance_at_start_up_is_one_line_and_the_daemon_polls(tmp_path: Path,
                                                                         limited: type[LimitedDaemon]) -> None:
    """KIND: at start-up, no inotify instance to be had (`fs.inotify.max_user_instances` reached) is one error
    line naming the sysctl to raise, not a traceback, and the daemon runs on by polling. INPUT: a limit of 0
    instances; an image dropped into inbox/."""
    daemon = limited(tmp_path, watches=8192, instances=0)
    wait_for(lambda: (daemon.data / "state" / "models" / "CURRENT").exists(), what="a first model")
    write_image(daemon.data / "inbox" / "photo.jpg", "red", seed=9)
    wait_for(lambda: _classified(daemon.data) == 1, timeout=NOTICED, what="the image classified by polling")
    assert daemon.metric("retraind_watch_errors_total", reason="instance_limit") == 1
    assert daemon.metric("retraind_watch_mode", folder="inbox", mode="polling") == 1
    daemon.stop()
    errors = [line for line in daemon.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "instance limit is reached (0 instances for this user)" in errors[0], errors
    assert "sysctl -w fs.inotify.max_user_instances=1024" in errors[0]
    assert "Traceback" not in daemon.log() and daemon.process.returncode == 0


def test_watchdogs_shutdown_race_line_is_not_an_error_of_ours(caplog: pytest.LogCaptureFixture) -> None:
    """KIND: watchdog's inotify emitter can begin one more read after `stop()` closed its instance and logs
    that at ERROR ("queue_events() called when the thread is inactive"): a harmless race inside watchdog's
    shutdown, seen in about one daemon stop in seven, which failed tests that hold a clean stop to no ERROR
    line. INPUT: a real observer, started and stopped, and the line as watchdog logs it; other lines of that
    logger still pass."""
    observer = InotifyObserver(lambda folder: None)
    observer.start()
    observer.stop()
    observer.join()
    source = logging.getLogger("watchdog.observers.inotify")
    with caplog.at_level(logging.WARNING):
        source.error("InotifyEmitter.queue_events() called when the thread is inactive")
        source.error("another watchdog error")
    assert [r.getMessage() for r in caplog.records] == ["another watchdog error"]


def test_reading_a_watched_file_sends_the_watcher_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watches ask inotify only for what the daemon acts on: reading a file (the daemon reads every inbox
    and training image) or a folder changing sends watchdog's threads no event to carry and drop (they were
    four events in six of an inbox file's)."""
    seen: list[type[object]] = []
    handle = watcher_module._Enqueue.on_any_event

    def noted(self: object, event: FileSystemEvent) -> None:
        seen.append(type(event))
        handle(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(watcher_module._Enqueue, "on_any_event", noted)
    inbox, events = tmp_path / "inbox", queue.Queue[object]()
    inbox.mkdir()
    watcher = Watcher({"inbox": inbox}, events, Metrics(), WatchConfig(mode="events"))
    watcher.start()
    try:
        image = inbox / "a.jpg"
        image.write_bytes(b"picture")
        wait_for(lambda: any(isinstance(e, FileEvent) and e.path == image for e in list(events.queue)),
                 what="the new file's event")
        for _ in range(5):
            image.read_bytes()
        (inbox / "marker.jpg").write_bytes(b"last")  # events come in order: once it is queued, the reads were
        wait_for(lambda: any(isinstance(e, FileEvent) and e.path.name == "marker.jpg" for e in list(events.queue)),
                 what="the marker's event")
    finally:
        watcher.stop()
    assert seen and all(kind in watcher_module._KINDS for kind in seen), sorted({k.__name__ for k in seen})
