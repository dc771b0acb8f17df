"""Full disks, read-only folders and unreadable files, through a real daemon: clear errors, nothing lost, and
the daemon carries on by itself once the trouble is gone.

The full disk is a small tmpfs and the read-only folder a read-only bind mount (both need the mount
capability: skipped with the reason otherwise). An unreadable file needs a process that permissions stop, which
root is not: that test runs the daemon (tests/crash_child.py) without root's permission override."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from daemon.scanner import walk_files
from daemon.store import Store
from tests.conftest import seed_classes, wait_for, write_image
from tests.test_daemon_e2e import results
from tests.test_reliability_crash import Daemon, add_training_images, result_lines


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount here ({' '.join(args)}): {done.stderr.strip()}")


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs as the daemon's data root."""
    data = tmp_path / "data"
    data.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(data))
    yield data
    unmount(data)


def fill(folder: Path) -> Path:
    """Write zeros until the file system is full; returns the filler file."""
    filler = folder / "filler"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(bytes(64 * 1024))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def errors(caplog: pytest.LogCaptureFixture, *needles: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and any(n in r.getMessage() for n in needles)]


def test_full_disk_loses_nothing_and_recovers(
    small_disk: Path, tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    data, staging = small_disk, small_disk / "staging"
    seed_classes(tmp_path)
    names = [f"photo-{i}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        write_image(staging / name, ("red", "blue")[i % 2], seed=70 + i)
    (staging / "garbage.jpg").write_bytes(b"not an image at all")
    with caplog.at_level(logging.ERROR), run_app(classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
        filler = fill(data)
        for name in [*names, "garbage.jpg"]:
            os.rename(staging / name, data / "inbox" / name)  # a rename needs no free space
        wait_for(lambda: errors(caplog, "No space left on device", "database or disk is full"),
                 what="a clear error about the full disk")
        in_inbox = {p.name for p in walk_files(data / "inbox")}
        journal = {json.loads(e.record)["file"] for e in app.store.journal_open()}
        assert in_inbox | journal == {*names, "garbage.jpg"} - {r["file"] for r in results(tmp_path)}
        filler.unlink()  # space returns
        wait_for(lambda: len(results(tmp_path)) == len(names) and not list(walk_files(data / "inbox")),
                 timeout=60, what="everything classified once space returned")
        wait_for(lambda: not app.store.journal_open(), what="every record written")
    assert sorted(r["file"] for r in results(tmp_path)) == names
    for record in results(tmp_path):
        destination = Path(record["destination"])
        assert json.loads(destination.with_name(destination.name + ".json").read_text()) == record
    assert json.loads((data / "rejected" / "garbage.jpg.error.json").read_text())["reason"] == "unsupported"
    with closing(Store(data / "state" / "store.sqlite")) as store:
        assert store._db().execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.fixture
def read_only_outbox(tmp_path: Path) -> Iterator[Path]:
    """`outbox/` bind-mounted read-only over itself (even root cannot write there); unmount to mend."""
    outbox = tmp_path / "data" / "outbox"
    for label in ("red", "blue"):
        (outbox / label).mkdir(parents=True)
    mount("--bind", str(outbox), str(outbox))
    done = subprocess.run(["mount", "-o", "remount,bind,ro", str(outbox)], capture_output=True, check=False)
    if done.returncode:
        unmount(outbox)
        pytest.skip(f"cannot remount read-only: {done.stderr.decode().strip()}")
    yield outbox
    if os.path.ismount(outbox):
        unmount(outbox)


def test_read_only_output_folder(
    tmp_path: Path, read_only_outbox: Path, run_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = tmp_path / "data" / "inbox"
    seed_classes(tmp_path)
    with caplog.at_level(logging.ERROR), run_app(classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        write_image(inbox / "a.jpg", "red", seed=90)
        write_image(inbox / "b.jpg", "blue", seed=91)
        wait_for(lambda: len(errors(caplog, "Read-only file system")) >= 2, what="a clear error for each file")
        assert sorted(p.name for p in walk_files(inbox)) == ["a.jpg", "b.jpg"] and not results(tmp_path)
        unmount(read_only_outbox)  # writable again
        wait_for(lambda: len(results(tmp_path)) == 2, timeout=60, what="both classified once writable")
    assert not list(walk_files(inbox))
    assert {r["file"]: Path(r["destination"]).parent.name for r in results(tmp_path)} == {"a.jpg": "red",
                                                                                            "b.jpg": "blue"}


def test_unreadable_files_and_a_folder_without_write_permission(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, permissions_apply=True)  # root ignores permissions; this daemon does not
    data = daemon.data
    add_training_images(data, 8, "base")
    locked = data / "outbox" / "red"
    locked.mkdir(parents=True)
    locked.chmod(0o555)
    daemon.start()
    try:
        wait_for(lambda: (data / "state" / "models" / "CURRENT").exists(), what="first model")
        for target in (data / "inbox" / "secret.png", data / "classes" / "blue" / "secret.png"):
            target.write_bytes((data / "classes" / "red" / "base-0.png").read_bytes())
            target.chmod(0o000)
        (data / "inbox" / "red.png").write_bytes((data / "classes" / "red" / "base-1.png").read_bytes())
        wait_for(lambda: (data / "rejected" / "secret.png.error.json").exists(), what="the unreadable file")
        wait_for(lambda: "Permission denied" in daemon.log_tail(), what="a clear error for the locked folder")
        assert (data / "inbox" / "red.png").exists() and not result_lines(data)
        locked.chmod(0o755)
        wait_for(lambda: [line["file"] for line in result_lines(data)] == ["red.png"], timeout=60,
                 what="the move once permitted")
        with closing(Store(data / "state" / "store.sqlite")) as store:
            # read before its chmod (a loaded machine), the file changes its ctime: it is read again, and refused
            entry = wait_for(lambda: (e := store.catalog_entry("blue/secret.png")) is not None and not e.ok and e,
                             what="the unreadable training file")
        assert not entry.ok
    finally:
        daemon.stop()
    record = json.loads((data / "rejected" / "secret.png.error.json").read_text())
    assert record["reason"] == "unreadable" and "Permission denied" in record["error"]
    assert not list(walk_files(data / "inbox"))
