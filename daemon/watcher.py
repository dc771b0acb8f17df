"""watchdog → bounded queue. Handlers only enqueue immutable events; a full queue or a kernel-side inotify
overflow sets `rescan_needed`, and the pipeline then rescans, so no lost event loses a file.

A rename is the writer's signal that a file is complete. On Linux the observer reports the halves of a rename
that crosses the watched folders' edge too (watchdog's "full events"), so a file renamed in from outside
arrives as CLOSED (taken at once, like a file its writer closed) instead of as CREATED (which waits
`settle_seconds`), and a folder renamed in arrives as MOVED; a file renamed out is DELETED."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

try:  # Linux: inotify reports a rename as a MOVED_FROM/MOVED_TO pair, one right after the other
    from watchdog.observers.inotify import InotifyObserver
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper as _MoveGrouper
except ImportError:  # pragma: no cover - other platforms have no grouper
    _MoveGrouper = None  # type: ignore[assignment, misc]
    InotifyObserver = None  # type: ignore[assignment, misc]

from daemon.events import EventKind, FileEvent
from daemon.metrics import Metrics

_KINDS: dict[type[FileSystemEvent], EventKind] = {
    FileCreatedEvent: EventKind.CREATED,
    FileModifiedEvent: EventKind.MODIFIED,
    FileClosedEvent: EventKind.CLOSED,
    FileDeletedEvent: EventKind.DELETED,
    DirDeletedEvent: EventKind.DELETED,
    FileMovedEvent: EventKind.MOVED,
    DirMovedEvent: EventKind.MOVED,
}


def _text(path: bytes | str) -> str:
    return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path


class _Enqueue(FileSystemEventHandler):
    def __init__(self, events: queue.Queue[object], overflowed: threading.Event, metrics: Metrics) -> None:
        self._events, self._overflowed, self._metrics = events, overflowed, metrics

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = _KINDS.get(type(event))
        if kind is None:
            return  # opened, closed-without-write, directory created/modified: the files inside tell us
        src, dest = _text(event.src_path), _text(event.dest_path) if kind is EventKind.MOVED else ""
        if kind is EventKind.MOVED and not src:  # renamed in from outside the watched folders: complete
            item = FileEvent(EventKind.MOVED, Path(dest), Path(dest)) if event.is_directory else \
                FileEvent(EventKind.CLOSED, Path(dest))
        elif kind is EventKind.MOVED and not dest:  # renamed out of them
            item = FileEvent(EventKind.DELETED, Path(src))
        else:
            item = FileEvent(kind, Path(src), Path(dest) if dest else None)
        try:
            self._events.put_nowait(item)
        except queue.Full:
            if not self._overflowed.is_set():
                self._metrics.overflows.inc()
            self._overflowed.set()


class _OverflowLog(logging.Handler):
    """watchdog reports a kernel inotify queue overflow only as a log record; turn it into a rescan. Its logger
    is kept at WARNING while we listen: a quieter log level must not silence the overflow."""

    def __init__(self, overflowed: threading.Event, metrics: Metrics) -> None:
        super().__init__(logging.WARNING)
        self._overflowed, self._metrics = overflowed, metrics

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._metrics.overflows.inc()
            self._overflowed.set()


#: How long watchdog holds a MOVED_FROM waiting for its MOVED_TO. Its default, 0.5 s, holds back every later
#: event too: each inbox file moved out to outbox/ delayed the next file by half a second. The kernel queues
#: the two halves of a rename back to back; an unpaired half still arrives, as a delete or a create.
MOVE_PAIRING_SECONDS = 0.005


class Watcher:
    def __init__(self, roots: list[Path], events: queue.Queue[object], metrics: Metrics) -> None:
        if _MoveGrouper is not None:
            _MoveGrouper.delay = MOVE_PAIRING_SECONDS
        self.rescan_needed = threading.Event()
        self._observer = Observer() if InotifyObserver is None else InotifyObserver(generate_full_events=True)
        self._observer.name = "retraind-watchdog"
        handler = _Enqueue(events, self.rescan_needed, metrics)
        for root in roots:
            self._observer.schedule(handler, str(root), recursive=True)
        self._log_handler = _OverflowLog(self.rescan_needed, metrics)
        self._watchdog_log = logging.getLogger("watchdog.observers.inotify_c")
        self._saved_level = logging.NOTSET

    def start(self) -> None:
        self._saved_level = self._watchdog_log.level
        self._watchdog_log.setLevel(logging.WARNING)
        self._watchdog_log.addHandler(self._log_handler)
        self._observer.start()

    def stop(self) -> None:
        """Stop and undo `start`; safe when `start` never ran or failed half-way."""
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=10)
        if self._log_handler not in self._watchdog_log.handlers:
            return
        self._watchdog_log.removeHandler(self._log_handler)
        self._watchdog_log.setLevel(self._saved_level)
