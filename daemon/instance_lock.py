"""One daemon per data root: an exclusive lock on `state/retraind.lock`, held for as long as the daemon runs.

Two daemons on one data root would each classify every inbox file (two moves racing, duplicate result lines)
and train on the same store. `flock(2)` is released by the kernel when the holder exits, however it ends, so
a crash never leaves a stale lock; the file keeps the holder's pid only to name it in the message."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "retraind.lock"
#: sysexits.h EX_TEMPFAIL: the data root is busy now; a later start may succeed
EX_TEMPFAIL = 75


class AlreadyRunning(Exception):
    """Another process holds the data root's lock; the message names it, its pid and the lock file."""


class InstanceLock:
    """The lock on `<state>/retraind.lock`, taken by `acquire` (never blocks) and dropped by `release`."""

    def __init__(self, state_dir: Path, data_root: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._data_root = data_root
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `AlreadyRunning` at once when another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(f"another retraind (pid {holder}) is running on {self._data_root} "
                                 f"(lock {self.path}); stop it first or set another data_root") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
