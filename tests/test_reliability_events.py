"""Overflow and missed events, through a real daemon: thousands of files dropped at once overflow the event
queue and a rescan finds every one; files no event announced are found by the periodic rescan, and by the
rescan that watchdog's report of a kernel inotify overflow triggers."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.events import FileEvent
from daemon.hookspecs import hookimpl
from tests.conftest import image_bytes, seed_classes, wait_for, write_image
from tests.test_daemon_e2e import results, scrape

BURST = int(os.environ.get("RETRAIND_BURST_FILES", "5000"))


class HoldFirstEvent:
    """Holds the pipeline on a file event, once armed, until released: meanwhile the event queue fills up."""

    def __init__(self) -> None:
        self.armed, self.held, self.release = threading.Event(), threading.Event(), threading.Event()

    @hookimpl
    def retraind_on_file_event(self, event: FileEvent) -> None:
        if self.armed.is_set() and not self.release.is_set():
            self.held.set()
            self.release.wait(120)


@pytest.mark.slow  # classifying 5,000 files fsyncs each move and record: about 40 s on two cores
def test_burst_overflows_the_queue_and_a_rescan_finds_every_file(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path)
    hold = HoldFirstEvent()
    names = [f"burst-{i:05d}.jpg" for i in range(BURST)]
    with run_app(extra=(hold,), classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
        hold.armed.set()
        write_image(data / "inbox" / "first.jpg", "red", seed=1)
        wait_for(hold.held.is_set, what="the pipeline held")
        for i, name in enumerate(names):
            (data / "inbox" / name).write_bytes(image_bytes("red" if i % 2 else "blue", seed=10_000 + i,
                                                            size=(16, 16)))
        hold.release.set()
        started = time.monotonic()
        wait_for(lambda: len(os.listdir(data / "inbox")) == 0, timeout=300, what="an empty inbox")
        print(f"{BURST + 1} files classified in {time.monotonic() - started:.1f} s after release")
        metrics = scrape(app)
    assert metrics["retraind_watch_overflows_total"] >= 1
    records = results(tmp_path)
    assert sorted(r["file"] for r in records) == sorted([*names, "first.jpg"])  # each once, none missing
    assert len({r["destination"] for r in records}) == len(records)
    assert sum(len(os.listdir(data / "outbox" / label)) for label in ("red", "blue")) == 2 * len(records)


class LoseEvents:
    """While `losing` is set, every file event is seen and then dropped: as if the kernel had lost it."""

    def __init__(self) -> None:
        self.losing = threading.Event()
        self.seen: set[Path] = set()

    @hookimpl
    def retraind_on_file_event(self, event: FileEvent) -> None:
        self.seen.add(event.path)

    @hookimpl(tryfirst=True)
    def retraind_accept_path(self, path: Path, area: str) -> bool | None:
        return False if self.losing.is_set() else None


def lose_events_for(app: Any, lose: LoseEvents, paths: list[Path]) -> None:
    """Write `paths` while their events are lost; afterwards only a rescan can find them."""
    lose.losing.set()
    for i, path in enumerate(paths):
        write_image(path, "blue", seed=100 + i)
    wait_for(lambda: set(paths) <= lose.seen and app.events.empty(), what="their events to be dropped")
    wait_for(app.pipeline.idle.is_set, what="an idle pipeline")
    lose.losing.clear()


def test_periodic_rescan_finds_files_whose_events_were_lost(tmp_path: Path, run_app: Any) -> None:
    data, lose = tmp_path / "data", LoseEvents()
    seed_classes(tmp_path)
    with run_app(extra=(lose,), watch={"rescan_interval_seconds": 1.0}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        lost = [data / "inbox" / "unannounced.jpg", data / "classes" / "blue" / "unannounced-blue.jpg"]
        lose_events_for(app, lose, lost)
        assert not results(tmp_path) and "blue/unannounced-blue.jpg" not in app.store.catalog()
        wait_for(lambda: results(tmp_path), what="the periodic rescan to find the inbox file")
        wait_for(lambda: app.store.catalog().get("blue/unannounced-blue.jpg"), what="... and the class file")
    assert [r["file"] for r in results(tmp_path)] == ["unannounced.jpg"]


@pytest.fixture
def watchdog_log_at_error() -> Iterator[None]:
    """As `setup_logging("ERROR")` leaves it: watchdog's warnings are not even created, unless we see to it."""
    logger = logging.getLogger("watchdog")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def test_inotify_overflow_triggers_a_rescan(tmp_path: Path, run_app: Any, watchdog_log_at_error: None) -> None:
    data, lose = tmp_path / "data", LoseEvents()
    seed_classes(tmp_path)
    with run_app(extra=(lose,), watch={"rescan_interval_seconds": 0}) as app:  # no periodic rescan
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
        lose_events_for(app, lose, [data / "inbox" / "lost.jpg"])
        # what watchdog 7 logs when the kernel's inotify queue overflowed (IN_Q_OVERFLOW)
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost")
        wait_for(lambda: results(tmp_path), what="the overflow's rescan to find the lost file")
        assert scrape(app)["retraind_watch_overflows_total"] == 1


class RenameFolderOnce:
    """A router that, the first time it is asked, renames the inbox sub-folder the batch's files are in, as a
    person does while the daemon files them (then lets the built-in router choose)."""

    def __init__(self, folder: Path, renamed: Path) -> None:
        self.folder, self.renamed, self.done = folder, renamed, False

    @hookimpl
    def retraind_route_result(self, result: Any, config: Any) -> None:
        if not self.done:
            self.done = True
            os.rename(self.folder, self.renamed)


def test_files_renamed_away_while_being_filed_get_one_record_each(tmp_path: Path, run_app: Any) -> None:
    """KIND: a file moved away by someone else between its classification and its move. `mv inbox/batch
    inbox/batch-2` while the daemon files `batch/`: each move failed (the source was gone) and left its journal
    entry open for recovery; the files were seen again under `batch-2/` and filed, and recovery then found the
    same file at the same destination and wrote its records a second time (two `results.jsonl` lines, two
    ids, for each of 39 files). INPUT: that rename, made at the first file's routing: every file ends in one
    place with exactly one record, and no entry stays open."""
    seed_classes(tmp_path)
    inbox = tmp_path / "data" / "inbox"
    batch = tmp_path / "batch"
    for i in range(6):
        write_image(batch / f"b{i}.jpg", "red" if i % 2 else "blue", seed=900 + i)
    router = RenameFolderOnce(inbox / "batch", inbox / "batch-2")
    with run_app(extra=(router,), classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        os.rename(batch, inbox / "batch")
        wait_for(lambda: len(results(tmp_path)) >= 6 and not app.store.journal_open(), timeout=30,
                 what="six files filed and no journal entry open")
        time.sleep(2.5)  # recovery's first retry comes 1 s after a failed move: give it time to double a record
        assert not app.store.journal_open()
    records = results(tmp_path)
    assert router.done and sorted(r["file"] for r in records) == [f"b{i}.jpg" for i in range(6)], records
    assert all(Path(r["destination"]).exists() for r in records)
    assert not [p for p in inbox.rglob("*") if p.is_file()]
