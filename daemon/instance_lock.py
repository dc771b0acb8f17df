"""One daemon per data root: an exclusive lock on `state/retraind.lock`, held for as long as the daemon runs,
and one on the data root and the inbox folders themselves (`flock(2)` on their directories: no file is made
in them), so a second daemon whose `folders.state` is elsewhere is refused too.

Two daemons on one data root would each classify every inbox file (two moves racing, duplicate result lines)
and train on the same store. `flock(2)` is released by the kernel when the holder exits, however it ends, so
a crash never leaves a stale lock; the file keeps the holder's pid only to name it in the message. A folder
on a file system that cannot lock directories (NFS emulates flock with byte-range locks, which need a file open
for writing) is left unlocked: the state lock still holds there."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "retraind.lock"
#: sysexits.h EX_TEMPFAIL: the data root is busy now; a later start may succeed
EX_TEMPFAIL = 75


class AlreadyRunning(Exception):
    """Another process holds the data root's lock; the message names it, its pid and the lock file."""


class InstanceLock:
    """The lock on `<state>/retraind.lock` and on the `folders` (the data root, the inbox), taken by `acquire`
    (never blocks) and dropped by `release`."""

    def __init__(self, state_dir: Path, data_root: Path, folders: Sequence[Path] = ()) -> None:
        self.path = state_dir / LOCK_FILE
        self._data_root = data_root
        self._folders = folders
        self._fd: int | None = None
        self._folder_fds: list[int] = []

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
        try:
            for folder in dict.fromkeys(self._folders):
                self._lock_folder(folder)
        except BaseException:
            self.release()
            raise

    def _lock_folder(self, folder: Path) -> None:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:  # not readable (a data root of mode 0711): the state lock holds alone
            log.debug("%s cannot be locked (%s); the state lock %s holds alone", folder, exc, self.path)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"another retraind is running on {folder} (its data root or inbox; its own state "
                                 f"lock is elsewhere); stop it first or give this one its own data_root") from None
        except OSError as exc:  # NFS: flock is emulated with byte-range locks, which a directory cannot take
            os.close(fd)
            log.debug("%s cannot be locked (%s); the state lock %s holds alone", folder, exc, self.path)
            return
        self._folder_fds.append(fd)

    def release(self) -> None:
        for fd in self._folder_fds:
            os.close(fd)
        self._folder_fds.clear()
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
