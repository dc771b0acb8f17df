"""`retraind run` as a real process speaking the sd_notify protocol to a datagram socket bound here, as systemd
would: READY with a STATUS, watchdog pings, RELOADING then READY on SIGHUP, a reload that cannot start (back to the
running config) and one refused, STOPPING and exit 0 on SIGTERM; a config error exits 78 with one line.
Its stderr is a terminal, so the start-up caching bar shows."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import EX_CONFIG
from tests.conftest import seed_classes
from tests.test_cli import write_config

REPO = Path(__file__).resolve().parents[1]
#: `retraind run` with the tiny test backbone registered as an extra plugin (it is not installed).
RUNNER = ("import sys; from daemon.cli import main; from tests.tiny_backbone import TinyBackbonePlugin; "
          "sys.exit(main(sys.argv[1:], plugins=[TinyBackbonePlugin()]))")


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    folder = Path(tempfile.mkdtemp(prefix="rtd", dir="/tmp"))  # sun_path holds ~108 bytes: keep it short
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


class Terminal:
    """A pseudo-terminal for the child's stderr, drained by a thread so the child never blocks on it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        self.output = b""
        self._reader = threading.Thread(target=self._drain, name="pty-reader")

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO once the child closed its end
                return
            if not chunk:
                return
            self.output += chunk

    def start(self) -> None:
        os.close(self.slave)
        self._reader.start()

    def close(self) -> None:
        self._reader.join(timeout=10)
        os.close(self.master)


def until(sock: socket.socket, prefix: str, timeout: float = 60.0) -> tuple[str, list[str]]:
    """Receive datagrams until one starts with `prefix`; returns it and the ones before it."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        if message.startswith(prefix):
            return message, seen
        seen.append(message)
    raise AssertionError(f"no {prefix!r} within {timeout}s; got {seen}")


def test_notify_protocol_from_start_to_stop(tmp_path: Path, notify_socket: socket.socket) -> None:
    seed_classes(tmp_path, per_label=20)
    config = write_config(tmp_path)
    original = config.read_text()
    assert "name: tiny" in original
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("TF_", "GRPC_"))},
           "NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    terminal = Terminal()
    child = subprocess.Popen([sys.executable, "-c", RUNNER, "--config", str(config), "run"], cwd=REPO, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal.slave)
    terminal.start()
    try:
        ready, _ = until(notify_socket, "READY=1")
        assert ready.splitlines()[1].startswith("STATUS=no model yet")
        until(notify_socket, "STATUS=serving model 1")
        until(notify_socket, "WATCHDOG=1", timeout=3)
        until(notify_socket, "WATCHDOG=1", timeout=3)

        child.send_signal(signal.SIGHUP)
        reloading, _ = until(notify_socket, "RELOADING=1", timeout=10)
        assert reloading.splitlines()[1].startswith("MONOTONIC_USEC=")
        ready, _ = until(notify_socket, "READY=1")
        assert ready.splitlines()[1] == "STATUS=serving model 1"

        config.write_text(original.replace("name: tiny", "name: nosuch"))  # valid, but cannot start
        child.send_signal(signal.SIGHUP)
        refused, _ = until(notify_socket, "STATUS=reload refused", timeout=30)
        assert "going back to the running config: backbone.name: no plugin provides 'nosuch'" in refused
        ready, _ = until(notify_socket, "READY=1")
        assert ready.splitlines()[1] == "STATUS=serving model 1"

        config.write_text("training: {l2: oops}\n")
        child.send_signal(signal.SIGHUP)
        refused, seen = until(notify_socket, "STATUS=reload refused", timeout=10)
        assert "training.l2: expected a list" in refused and "RELOADING=1" not in seen
        until(notify_socket, "WATCHDOG=1", timeout=3)

        child.send_signal(signal.SIGTERM)
        until(notify_socket, "STOPPING=1", timeout=10)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        terminal.close()
    assert b"caching bottlenecks" in terminal.output
    shown = terminal.output.decode(errors="replace")
    assert "retraind started" in shown
    assert not [noise for noise in TENSORFLOW_NOISE if noise in shown], shown[:2000]


def test_config_error_exits_78_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("http:\n  port: 99999\n")
    result = subprocess.run([sys.executable, "-m", "daemon", "--config", str(config), "run"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == EX_CONFIG
    assert result.stderr == "retraind: http.port: 99999 is out of range [0, 65535]\n"
    assert result.stdout == ""


#: What TensorFlow, absl, XLA and TFLite print on their own on a machine without a GPU.
TENSORFLOW_NOISE = ("absl::", "cuda", "cuInit", "oneDNN", "cpu_feature_guard", "XNNPACK", "TF_ENABLE_ONEDNN_OPTS")


def test_no_tensorflow_noise_on_a_cpu_machine(tmp_path: Path) -> None:
    """A fresh process (TensorFlow not yet loaded) with none of TensorFlow's variables set: our output only."""
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "GRPC_"))}
    done = subprocess.run([sys.executable, "-c", RUNNER, "--config", str(config), "check-config"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("config OK:") and done.stdout.count("\n") == 1
