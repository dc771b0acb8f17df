"""Stopping a real daemon process (tests/crash_child.py).

SIGTERM in the middle of a backlog: the stop finishes the work in hand and leaves the rest where it is for the
next start (README "Layout": "the batch in hand finishes; anything else is found again at the next start"), so
that `make run`'s Ctrl-C, or systemd's stop (`TimeoutStopSec`), is not held up for as long as the backlog
takes, while nothing is lost or done twice. A start that fails half-way (the OS refuses a thread: memory, a
pids limit) stops what it started, and the process exits instead of waiting forever for a thread."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.scanner import walk_files
from tests.conftest import wait_for
from tests.test_reliability_crash import (
    CONFIG,
    REPO,
    Daemon,
    add_training_images,
    check_inbox_outcome,
    drop_inbox_files,
    result_lines,
    stored_vectors,
    trained_on_everything,
)

#: 300 inbox images at the crash child's 5 ms each: 1.5 s of engine time, against 3 batches of 8 in hand
INBOX_PER_LABEL = 100
#: 600 training images, against the chunk in hand and the one begun (`daemon.backfill._CHUNK`, 128 each)
CLASSES_PER_LABEL = 200


def stopped(daemon: Daemon) -> float:
    """SIGTERM, a clean exit (status 0, everything checked); the seconds it took."""
    started = time.monotonic()
    daemon.stop()
    return time.monotonic() - started


def test_a_stop_in_an_inbox_burst_leaves_the_files_not_begun_in_the_inbox(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    add_training_images(daemon.data, 10, "base")
    daemon.finish(lambda: trained_on_everything(daemon.data))
    daemon.start()
    dropped = drop_inbox_files(daemon.data, "burst", INBOX_PER_LABEL)
    wait_for(lambda: result_lines(daemon.data), what="the first records")
    took = stopped(daemon)
    left = sum(1 for _ in walk_files(daemon.data / "inbox"))
    assert left > len(dropped) // 2, f"the stop classified the whole burst first ({took:.1f} s)"
    daemon.finish(lambda: trained_on_everything(daemon.data))
    check_inbox_outcome(daemon.data, dropped, set())


def test_a_stop_while_caching_leaves_the_chunks_not_begun_for_the_next_start(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    add_training_images(daemon.data, CLASSES_PER_LABEL, "bulk")
    daemon.start()
    wait_for(lambda: stored_vectors(daemon.data), what="the first vectors cached")
    took = stopped(daemon)
    cached = len(stored_vectors(daemon.data))
    assert cached < CLASSES_PER_LABEL * 3 // 2, f"the stop cached the whole backlog first ({took:.1f} s)"
    daemon.finish(lambda: trained_on_everything(daemon.data))  # and nothing computed twice (Daemon checks)
    assert len(stored_vectors(daemon.data)) == CLASSES_PER_LABEL * 3


@pytest.mark.parametrize("thread", ["retraind-cache", "retraind-pipeline", "retraind-trainer", "retraind-batcher",
                                    "retraind-http"])
def test_a_start_that_fails_half_way_ends_the_process(tmp_path: Path, thread: str) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG.replace("http: {enabled: false}", "http: {port: 0}"))
    add_training_images(tmp_path / "data", 2, "few")
    try:
        done = subprocess.run([sys.executable, "-m", "tests.crash_child", "config.yaml", "--refuse-thread", thread],
                              cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{thread} could not start, and the process never ended: a thread it started "
                             "was left running") from exc
    assert done.returncode == 1 and "can't start new thread" in done.stderr, done.stderr[-2000:]
