"""watchdog's inotify observer, told which folders the kernel's watch limit kept out.

watchdog watches a tree by one inotify watch per folder and, when the kernel refuses one for a sub-folder (the
per-user limit `fs.inotify.max_user_watches`), it skips that folder without a word: its files would be seen only
by the next rescan. The observer here is the same, except that each refused watch is reported.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
from watchdog.observers.inotify import InotifyFullEmitter
from watchdog.observers.inotify_c import CallbackId, InotifyFD, Mask, WatchCallback, WatchDescriptor

#: errno → (metric reason, what runs out, the sysctl to raise, a value to suggest)
_LIMITS = {
    errno.ENOSPC: ("watch_limit", "watches", "fs.inotify.max_user_watches", 524288),
    errno.EMFILE: ("instance_limit", "instances", "fs.inotify.max_user_instances", 1024),
}


def limit_hint(exc: OSError) -> tuple[str, str]:
    """(metric reason, one phrase for the log) for an inotify failure: which limit, its value, how to raise it.

    The value is the one that applies here: `/proc/sys/user/max_inotify_*` is this user namespace's own limit
    (the same as the sysctl on a host; a container's may be lower)."""
    if exc.errno not in _LIMITS:
        return "other", f"inotify failed ({exc.strerror or exc})"
    reason, what, sysctl, suggest = _LIMITS[exc.errno]
    try:
        current = Path("/proc/sys/user", f"max_inotify_{what}").read_text().strip()
    except OSError:
        current = "unknown"
    return reason, (f"the inotify {reason.replace('_', ' ')} is reached ({current} {what} for this user); raise it with `sysctl -w {sysctl}={suggest}` (and a file in /etc/sysctl.d/ "
                    "to keep it)")


class _ReportingInotifyFD(InotifyFD):
    def __init__(self, on_watch_failed: Callable[[Path], None]) -> None:
        super().__init__()  # inotify_init: OSError(EMFILE) at the instance limit
        self._on_watch_failed = on_watch_failed

    def add_callback(self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId) -> WatchDescriptor:
        try:
            return super().add_callback(path, mask, callback, id_)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._on_watch_failed(Path(os.fsdecode(path)))
            raise


#: what watchdog logs, at ERROR, when its emitter thread reads after `stop()` has closed its inotify instance
_SHUTDOWN_RACE = "InotifyEmitter.queue_events() called when the thread is inactive"


def _not_the_shutdown_race(record: logging.LogRecord) -> bool:
    """A filter for watchdog's inotify logger. Its emitter loop can start one more read after `stop()` has
    closed the instance (a race inside watchdog's shutdown: the read is skipped, nothing is lost, the thread
    ends), and says so as an ERROR, seen in about one stop in seven here; that one line is dropped."""
    return record.msg != _SHUTDOWN_RACE


class InotifyObserver(BaseObserver):
    """watchdog's InotifyObserver (with `generate_full_events`: the halves of a rename across the watched
    folders' edge are reported as moves) and one private inotify instance that calls `on_watch_failed(folder)` for
    each folder the watch limit kept out (from inotify's thread, or from `schedule`). Raises OSError when no
    inotify instance can be had (EMFILE: `fs.inotify.max_user_instances`)."""

    def __init__(self, on_watch_failed: Callable[[Path], None]) -> None:
        logging.getLogger("watchdog.observers.inotify").addFilter(_not_the_shutdown_race)  # kept once, however many observers
        self._inotify_fd = _ReportingInotifyFD(on_watch_failed)
        self._inotify_fd.name = "retraind-inotify"
        self._inotify_fd.start()
        super().__init__(InotifyFullEmitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self._inotify_fd)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        if self._inotify_fd.is_alive():
            self._inotify_fd.join()
