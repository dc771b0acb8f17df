"""What the daemon tells a person at INFO: what it waits for, and one line per classified inbox file, summed up
during a burst."""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.burst_log import BurstLog
from daemon.logs import setup_logging
from tests.conftest import seed_classes, wait_for, write_image


def test_says_what_it_waits_for(tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="daemon")
    with run_app() as app:
        classes = app.config.folder("classes")
    assert f"no training images yet: put images in {classes}/<label>/" in caplog.text

    caplog.clear()
    write_image(classes / "red" / "only.jpg", "red", seed=1)
    with run_app() as app:
        wait_for(lambda: app.trainer.runs, what="a training attempt")
    assert "no training images yet" not in caplog.text
    assert f"training waits for images of two labels or more (have: red): put them in {classes}/<label>/" \
        in caplog.text


def test_one_line_per_classified_file(tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    seed_classes(tmp_path)
    inbox = tmp_path / "data" / "inbox"
    caplog.set_level(logging.INFO, logger="daemon.inbox")
    with run_app(classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        write_image(inbox / "a.jpg", "red", seed=901)
        write_image(inbox / "b.jpg", "blue", seed=902)
        wait_for(lambda: not any(inbox.iterdir()), what="the inbox to empty")
    lines = sorted(r.getMessage() for r in caplog.records if r.name == "daemon.inbox" and "->" in r.getMessage())
    assert len(lines) == 2
    assert lines[0].startswith("a.jpg -> red (") and lines[0].endswith(") -> outbox/red/a.jpg")
    assert lines[1].startswith("b.jpg -> blue (") and lines[1].endswith(") -> outbox/blue/b.jpg")


@pytest.fixture
def daemon_stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The daemon's own logging set-up (`setup_logging`, as `retraind run` makes it) for one test, its
    handler writing into the returned buffer instead of stderr; undone after."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    names = ("", "watchdog", "PIL", "matplotlib", "tensorflow", "absl", "keras", "h5py")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    handlers = logging.getLogger().handlers[:]
    buffer = io.StringIO()
    with warnings.catch_warnings():
        setup_logging("INFO")
        (handler,) = logging.getLogger().handlers
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        yield buffer
    logging.getLogger().handlers[:] = handlers
    for logger, level in saved:
        logger.setLevel(level)


def test_a_file_name_cannot_break_or_forge_log_lines(tmp_path: Path, run_app: Any,
                                                     daemon_stderr: io.StringIO) -> None:
    """KIND: control characters in a file name (a newline, a carriage return, a terminal escape), which
    Linux allows anywhere in a name. Logged raw, one file's line became two, the second a forged log line
    of the attacker's choosing (or a terminal escape sequence). INPUT: an image and a non-image with such
    names dropped into a real daemon's inbox; every line on stderr must be one of the daemon's own (time
    first), and the names appear escaped."""
    seed_classes(tmp_path)
    inbox = tmp_path / "data" / "inbox"
    forged = "2026-11-30 06:00:00,000 ERROR MainThread daemon.app: forged"
    with run_app(classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        write_image(inbox / f"a\n{forged}.jpg", "red", seed=903)
        (inbox / f"b\r\x1b[2Jx\n{forged}.jpg").write_text("not an image")
        wait_for(lambda: not any(inbox.iterdir()), what="the inbox to empty")
    err = daemon_stderr.getvalue()
    assert "a\\n2026-11-30 06:00:00,000 ERROR MainThread daemon.app: forged.jpg -> red (" in err
    assert "b\\r\\x1b[2Jx\\n2026-11-30" in err
    for line in err.splitlines():
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line), line
        assert "\x1b" not in line and "\r" not in line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_becomes_a_summary_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    lines = BurstLog(logging.getLogger("burst"), "inbox files classified", lines=3, window=10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="burst")
    for i in range(8):
        lines.info("outbox/red" if i % 2 else "review", "file %d", i)
        clock.now += 0.5
    lines.flush()  # the window is still open: nothing yet
    assert [r.getMessage() for r in caplog.records] == ["file 0", "file 1", "file 2"]
    clock.now = 111.0
    lines.flush()
    assert caplog.records[-1].getMessage() == \
        "... and 5 more inbox files classified in the last 11 s (outbox/red: 3, review: 2)"
    lines.info("outbox/red", "file %d", 8)  # a quiet spell: one line again, at once
    assert caplog.records[-1].getMessage() == "file 8"
    assert len(caplog.records) == 5
