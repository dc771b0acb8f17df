"""SystemdNotifier against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.notify import SystemdNotifier


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket, with NOTIFY_SOCKET pointing at it (as systemd sets it up)."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) >= 100:  # sun_path is ~108 bytes; a deep $TMPDIR could overflow it
        path = Path(tempfile.mkdtemp(prefix="rtd", dir="/tmp")) / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5.0)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()
        if path.parent != tmp_path:
            shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture
def notifier(notify_socket: socket.socket) -> Iterator[SystemdNotifier]:
    n = SystemdNotifier()
    try:
        yield n
    finally:
        n.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def assert_no_more(sock: socket.socket) -> None:
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_enabled_with_socket(notifier: SystemdNotifier) -> None:
    assert notifier.enabled


def test_ready_sends_ready_and_status(notifier: SystemdNotifier, notify_socket: socket.socket) -> None:
    notifier.ready("serving model v3")
    assert recv(notify_socket) == "READY=1\nSTATUS=serving model v3"
    assert_no_more(notify_socket)


def test_status(notifier: SystemdNotifier, notify_socket: socket.socket) -> None:
    notifier.status("training: 12/40 epochs")
    assert recv(notify_socket) == "STATUS=training: 12/40 epochs"


def test_status_newlines_cannot_inject_fields(
    notifier: SystemdNotifier, notify_socket: socket.socket
) -> None:
    notifier.status("bad label\nREADY=1")
    assert recv(notify_socket) == "STATUS=bad label READY=1"


def test_reloading_carries_monotonic_usec(notifier: SystemdNotifier, notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = recv(notify_socket).split("\n")
    assert len(lines) == 2
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_watchdog(notifier: SystemdNotifier, notify_socket: socket.socket) -> None:
    notifier.watchdog()
    assert recv(notify_socket) == "WATCHDOG=1"


def test_stopping(notifier: SystemdNotifier, notify_socket: socket.socket) -> None:
    notifier.stopping()
    assert recv(notify_socket) == "STOPPING=1"


def test_messages_arrive_in_order_one_datagram_each(
    notifier: SystemdNotifier, notify_socket: socket.socket
) -> None:
    notifier.status("loading")
    notifier.ready("ready")
    notifier.watchdog()
    notifier.stopping()
    got = [recv(notify_socket) for _ in range(4)]
    assert got == ["STATUS=loading", "READY=1\nSTATUS=ready", "WATCHDOG=1", "STOPPING=1"]
    assert_no_more(notify_socket)


def test_close_is_idempotent_and_silences(notifier: SystemdNotifier, notify_socket: socket.socket) -> None:
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    notifier.watchdog()
    assert_no_more(notify_socket)


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SystemdNotifier()
    assert not n.enabled
    n.ready("x")
    n.status("x")
    n.reloading()
    n.watchdog()
    n.stopping()
    n.close()


def test_socket_gone_is_swallowed(notify_socket: socket.socket) -> None:
    """A socket that vanished after connect (systemd restarted) must not raise from a send."""
    n = SystemdNotifier()
    path = notify_socket.getsockname()
    notify_socket.close()
    os.unlink(path)
    try:
        n.watchdog()
        n.stopping()
    finally:
        n.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("60000000", None, 30.0),
        ("60000000", "self", 30.0),
        ("1000000", None, 0.5),
        (" 2000000 ", None, 1.0),
        ("60000000", "1", None),  # watchdog belongs to another process
        ("0", None, None),
        ("-5", None, None),
        ("", None, None),
        ("sixty", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch,
    notifier: SystemdNotifier,
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert notifier.watchdog_interval() == expected
