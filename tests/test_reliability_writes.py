"""Files still being written, through a real daemon: a slow chunked copy, an rsync-style temporary name renamed
into place, a file that grows after it was first closed, a file touched empty then filled. Each is processed
once, whole, after it is complete; none is half-read, rejected or taken from under its writer."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.events import EventKind
from daemon.pending import TEMPORARY_FACTOR, WRITING_FACTOR, PendingFiles, looks_temporary
from tests.conftest import image_bytes, seed_classes, wait_for
from tests.test_daemon_e2e import results, scrape
from tests.tiny_backbone import TinyBackbonePlugin

PAUSE = 0.6  # longer than the test config's settle_seconds (0.2): a writer that stops to think


def slow_write(path: Path, data: bytes, pieces: int = 4) -> None:
    """One open, several writes with pauses, one close (a slow network copy)."""
    step = -(-len(data) // pieces)
    with path.open("wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start : start + step])
            fh.flush()
            time.sleep(PAUSE)


def rsync_style(path: Path, data: bytes) -> None:
    """rsync: write `.name.XXXXXX` slowly, then rename it to `name`."""
    temporary = path.with_name(f".{path.name}.Ab3dE9")
    assert looks_temporary(temporary)
    slow_write(temporary, data)
    os.rename(temporary, path)


def grow_after_close(path: Path, data: bytes) -> None:
    """Written and closed half-way, reopened soon after and finished (an appending logger, a resumed copy)."""
    half = len(data) // 2
    path.write_bytes(data[:half])
    time.sleep(0.05)
    with path.open("ab") as fh:
        fh.write(data[half:])


def touch_then_fill(path: Path, data: bytes) -> None:
    path.touch()
    time.sleep(0.05)
    path.write_bytes(data)


def run_writers(jobs: list[tuple[Callable[[Path, bytes], None], Path, bytes]]) -> None:
    errors: list[BaseException] = []

    def run(job: Callable[[Path, bytes], None], path: Path, data: bytes) -> None:
        try:
            job(path, data)
        except BaseException as exc:  # noqa: BLE001 - e.g. the rsync rename fails if the temp file was taken
            errors.append(exc)

    threads = [threading.Thread(target=run, args=job, name=f"writer-{job[1].name}") for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors


def test_files_still_being_written(tmp_path: Path, run_app: Any, tiny: TinyBackbonePlugin) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path)
    inbox, red = data / "inbox", data / "classes" / "red"
    contents = {name: image_bytes(colour, seed=300 + i, size=(160, 120))  # about 6 kB: several pieces
                for i, (name, colour) in enumerate([("slow.jpg", "red"), ("synced.jpg", "blue"),
                                                     ("grown.jpg", "red"), ("filled.jpg", "blue"),
                                                     ("slow-train.jpg", "red")])}
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
        embedded = tiny.images_embedded
        run_writers([(slow_write, inbox / "slow.jpg", contents["slow.jpg"]),
                     (rsync_style, inbox / "synced.jpg", contents["synced.jpg"]),
                     (grow_after_close, inbox / "grown.jpg", contents["grown.jpg"]),
                     (touch_then_fill, inbox / "filled.jpg", contents["filled.jpg"]),
                     (slow_write, red / "slow-train.jpg", contents["slow-train.jpg"])])
        wait_for(lambda: len(results(tmp_path)) >= 4 and not list(inbox.iterdir()), what="four results")
        wait_for(lambda: app.store.catalog().get("red/slow-train.jpg"), what="the new training image")
        wait_for(lambda: app.pipeline.idle.is_set(), what="an idle pipeline")
        metrics = scrape(app)
        assert tiny.images_embedded - embedded == 5  # each file read once, whole
        entry = app.store.catalog()["red/slow-train.jpg"]
    records = results(tmp_path)
    assert sorted(r["file"] for r in records) == ["filled.jpg", "grown.jpg", "slow.jpg", "synced.jpg"]
    for record in records:
        assert record["sha256"] == hashlib.sha256(contents[record["file"]]).hexdigest(), record["file"]
        assert Path(record["destination"]).read_bytes() == contents[record["file"]]
    assert {r["file"]: r["label"] for r in records} == {"slow.jpg": "red", "synced.jpg": "blue",
                                                         "grown.jpg": "red", "filled.jpg": "blue"}
    assert entry.ok and entry.sha256 == hashlib.sha256(contents["slow-train.jpg"]).hexdigest()
    assert not list((data / "rejected").iterdir())
    assert not [k for k, v in metrics.items() if k.startswith("retraind_rejected_files_total{") and v]


def test_when_a_pending_file_is_due(tmp_path: Path) -> None:
    """The rules behind the above, on real files: a close makes a file due, growth without a close waits
    WRITING_FACTOR settle periods, a temporary name TEMPORARY_FACTOR, anything else one settle period."""
    settle = 0.05
    pending = PendingFiles(settle)
    files = {name: tmp_path / name for name in ("closed", "touched", "growing", "moved-in", ".x.jpg.Ab3dE9")}
    for path in files.values():
        path.write_bytes(b"12345")
    started = time.monotonic()
    pending.add(files["closed"], EventKind.CREATED)
    pending.add(files["closed"], EventKind.MODIFIED)
    pending.add(files["closed"], EventKind.CLOSED)
    pending.add(files["touched"], EventKind.CLOSED)
    pending.add(files["touched"], EventKind.MODIFIED)  # attributes only (same size) after the close
    pending.add(files["growing"], EventKind.MODIFIED)
    pending.add(files["moved-in"], EventKind.CREATED)
    pending.add(files[".x.jpg.Ab3dE9"], EventKind.CLOSED)
    due_after: dict[str, float] = {}

    def collect() -> bool:
        due_after.update((path.name, time.monotonic() - started) for path in pending.due())
        return len(due_after) == len(files)

    wait_for(collect, what="every file due")
    assert due_after["closed"] < settle and due_after["touched"] < settle
    assert settle <= due_after["moved-in"] < settle * WRITING_FACTOR
    assert due_after["growing"] >= settle * WRITING_FACTOR
    assert due_after[".x.jpg.Ab3dE9"] >= settle * TEMPORARY_FACTOR
    pending.add(files["closed"], EventKind.CLOSED)
    files["closed"].unlink()
    assert not pending.due() and not len(pending)  # gone before it was taken: forgotten
