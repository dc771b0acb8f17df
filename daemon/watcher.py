"""watchdog → bounded queue, for each watched root (`classes/`, `inbox/`). Handlers only enqueue immutable events;
a full queue or a kernel-side inotify overflow sets `rescan_needed`, and the pipeline then rescans, so no lost
event loses a file.

A root is watched by inotify events, or polled (watchdog's `PollingObserver`, every `watch.poll_interval_seconds`)
where events do not come: in `watch.mode: auto`, a root on a network or FUSE file system (another machine's
writes send no inotify event here), and always a folder inotify cannot watch because a kernel limit is reached
(`fs.inotify.max_user_watches`, `fs.inotify.max_user_instances`): that is one error line naming the sysctl and
a count in `retraind_watch_errors_total{reason}`, never a silently unwatched folder.

The guard thread (`retraind-watch-guard`) checks twice a second, and at once when a folder is deleted or moved,
that each root is still the folder being watched: a root deleted, moved away or replaced by another folder of the
same name is logged, counted (`retraind_watch_root_changes_total`), watched again once it is there and rescanned;
while it is missing, `missing()` names it and /healthz says degraded.

A rename is the writer's signal that a file is complete. On Linux the observer reports the halves of a rename
that crosses the watched folders' edge too (watchdog's "full events"), so a file renamed in from outside
arrives as CLOSED (taken at once, like a file its writer closed) instead of as CREATED (which waits
`settle_seconds`), and a folder renamed in arrives as MOVED; a file renamed out is DELETED."""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from daemon.config import WatchConfig
from daemon.events import EventKind, FileEvent
from daemon.fstype import file_system
from daemon.inotify import InotifyObserver, limit_hint
from daemon.metrics import Metrics

try:  # Linux: inotify reports a rename as a MOVED_FROM/MOVED_TO pair, one right after the other
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper as _MoveGrouper
except ImportError:  # pragma: no cover - other platforms have no grouper
    _MoveGrouper = None  # type: ignore[assignment, misc]

log = logging.getLogger(__name__)

_KINDS: dict[type[FileSystemEvent], EventKind] = {
    FileCreatedEvent: EventKind.CREATED,
    FileModifiedEvent: EventKind.MODIFIED,
    FileClosedEvent: EventKind.CLOSED,
    FileDeletedEvent: EventKind.DELETED,
    DirDeletedEvent: EventKind.DELETED,
    FileMovedEvent: EventKind.MOVED,
    DirMovedEvent: EventKind.MOVED,
}

#: What the watches ask for (watchdog's `event_filter`): only the kinds above. Without it inotify reported every
#: open and close-without-write too (the daemon's own reads of each inbox and training image) and watchdog
#: added a folder-modified event to each create, move and delete: four events in six, each carried through
#: watchdog's threads to be dropped by `_Enqueue`.
_EVENT_FILTER: list[type[FileSystemEvent]] = list(_KINDS)

#: How often the guard checks that each root is still the folder watched (a stat each): "at once" for a
#: `mv inbox inbox.old`, which inotify reports to nobody.
ROOT_CHECK_SECONDS = 0.5


def _text(path: bytes | str) -> str:
    return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path


class _Enqueue(FileSystemEventHandler):
    """One per watched root (and the folders polled inside it): `folder_gone(path)` hears of every folder
    deleted or moved away in what this root's watches see, the root itself included."""

    def __init__(self, events: queue.Queue[object], overflowed: threading.Event, metrics: Metrics,
                 folder_gone: Callable[[Path], None]) -> None:
        self._events, self._overflowed, self._metrics = events, overflowed, metrics
        self._folder_gone = folder_gone

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = _KINDS.get(type(event))
        if kind is None:
            return  # opened, closed-without-write, directory created/modified: the files inside tell us
        src, dest = _text(event.src_path), _text(event.dest_path) if kind is EventKind.MOVED else ""
        if event.is_directory and src:
            self._folder_gone(Path(src))
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


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder at `path`, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if os.path.isdir(path) else None


@dataclass
class _Root:
    area: str
    path: Path
    identity: tuple[int, int] | None = None  # of the folder watched now; None while not watched
    missing: bool = False
    #: the folder watched now was deleted (a new one may have its inode number: identity cannot tell)
    lost: bool = False
    generation: int = 0  # counts the watches made, so a late event about an old folder is not taken as news
    mode: str = ""
    watches: list[tuple[BaseObserver, ObservedWatch]] = field(default_factory=list)
    polled: list[Path] = field(default_factory=list)  # folders inside it inotify could not watch
    handler: _Enqueue | None = None  # of this generation's watches


class Watcher:
    """Watches `roots` (area name → folder) into `events`; see the module docstring."""

    def __init__(self, roots: Mapping[str, Path], events: queue.Queue[object], metrics: Metrics,
                 config: WatchConfig) -> None:
        if _MoveGrouper is not None:
            _MoveGrouper.delay = MOVE_PAIRING_SECONDS
        self.rescan_needed = threading.Event()
        self._config, self._metrics = config, metrics
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._events = events
        self._roots = [_Root(area, path) for area, path in roots.items()]
        self._inotify: InotifyObserver | None = None
        self._polling = PollingObserver(timeout=config.poll_interval_seconds)
        self._polling.name = "retraind-poll"
        self._unwatched: list[Path] = []  # folders inotify failed to watch, for the guard (under _lock)
        self._lock = threading.Lock()
        self._guard = threading.Thread(target=self._guard_loop, name="retraind-watch-guard")
        self._log_handler = _OverflowLog(self.rescan_needed, metrics)
        self._watchdog_log = logging.getLogger("watchdog.observers.inotify_c")
        self._saved_level = logging.NOTSET

    def missing(self) -> list[str]:
        """Areas whose root folder is not there now (deleted, moved away, unmounted)."""
        return [root.area for root in self._roots if root.missing]

    def start(self) -> None:
        self._saved_level = self._watchdog_log.level
        self._watchdog_log.setLevel(logging.WARNING)
        self._watchdog_log.addHandler(self._log_handler)
        # watchdog warns when it re-adds a watch it holds (a folder made and filled in one go): harmless
        warnings.filterwarnings("ignore", "Callback with id .* already exists", RuntimeWarning)
        if self._config.mode != "polling":
            self._inotify = self._make_inotify()
        self._polling.start()
        for root in self._roots:
            self._check(root)
        self._guard.start()

    def stop(self) -> None:
        """Stop and undo `start`; safe when `start` never ran or failed half-way."""
        self._stopping.set()
        self._wake.set()
        if self._guard.is_alive():
            self._guard.join()
        for observer in (self._inotify, self._polling):
            if observer is not None:
                observer.stop()  # also closes the inotify instance of one never started
                if observer.is_alive():
                    observer.join(timeout=10)
        if self._log_handler not in self._watchdog_log.handlers:
            return
        self._watchdog_log.removeHandler(self._log_handler)
        self._watchdog_log.setLevel(self._saved_level)

    def _make_inotify(self) -> InotifyObserver | None:
        try:
            observer = InotifyObserver(self._on_watch_failed)
        except OSError as exc:
            reason, hint = limit_hint(exc)
            log.error("cannot use inotify: %s; every folder is polled every %g s instead", hint,
                      self._config.poll_interval_seconds)
            self._metrics.watch_errors.labels(reason=reason).inc()
            return None
        observer.name = "retraind-watchdog"
        observer.start()
        return observer

    def _handler(self, root: _Root) -> _Enqueue:
        generation = root.generation

        def folder_gone(path: Path) -> None:
            if path == root.path and root.generation == generation:
                root.lost = True
            self._wake.set()  # perhaps a root: the guard looks now rather than at its next round

        return _Enqueue(self._events, self.rescan_needed, self._metrics, folder_gone)

    def _on_watch_failed(self, path: Path) -> None:
        """Called by inotify's thread (or a schedule) for a folder the watch limit kept out."""
        with self._lock:
            self._unwatched.append(path)
        self._wake.set()

    def _guard_loop(self) -> None:
        while True:
            self._wake.wait(ROOT_CHECK_SECONDS)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                for root in self._roots:
                    self._check(root)
                self._poll_unwatched()
            except Exception:
                log.exception("checking the watched folders failed; trying again in %.1f s", ROOT_CHECK_SECONDS)

    def _check(self, root: _Root) -> None:
        """Watch `root` again if it is no longer the folder watched: deleted, moved away, replaced, back."""
        identity = _identity(root.path)
        if identity is not None and identity == root.identity and not root.lost:
            return
        watched = root.identity is not None
        self._unwatch(root)
        if identity is None:
            if not root.missing:
                root.missing = True
                self._metrics.root_missing.labels(folder=root.area).set(1)
                if watched:
                    self._metrics.root_changes.labels(folder=root.area).inc()
                log.warning("%s folder %s is gone (deleted, moved away or unmounted); its files are not seen "
                            "until it is back", root.area, root.path)
            return
        if root.missing or watched:
            if not root.missing:
                self._metrics.root_changes.labels(folder=root.area).inc()
            log.warning("%s folder %s %s: watching it and rescanning", root.area, root.path,
                        "is back" if root.missing else "was replaced by another folder")
            self.rescan_needed.set()
        root.missing = False
        self._metrics.root_missing.labels(folder=root.area).set(0)
        try:
            self._watch(root, identity)
        except OSError as exc:  # gone again meanwhile: the next round sees it
            log.debug("%s folder %s: cannot watch it yet (%s)", root.area, root.path, exc)
            self._unwatch(root)

    def _watch(self, root: _Root, identity: tuple[int, int]) -> None:
        root.generation += 1
        root.lost = False
        handler = self._handler(root)
        fs = file_system(root.path)
        mode = self._config.mode
        if mode == "auto":
            mode = "polling" if fs.remote else "events"
        elif mode == "events" and fs.remote:
            log.warning("%s folder %s is on %s and watch.mode is events: writes made elsewhere (another machine, "
                        "the backing store) send no event and wait for the periodic rescan", root.area, root.path,
                        fs.name)
        if mode == "events" and self._inotify is not None:
            try:
                root.watches.append((self._inotify, self._inotify.schedule(handler, str(root.path),
                                                                           recursive=True,
                                                                           event_filter=_EVENT_FILTER)))
            except OSError as exc:
                reason, hint = limit_hint(exc)
                log.error("cannot watch %s folder %s: %s; it is polled every %g s instead", root.area, root.path,
                          hint, self._config.poll_interval_seconds)
                self._metrics.watch_errors.labels(reason=reason).inc()
                mode = "polling"
        elif mode == "events":
            mode = "polling"  # no inotify instance at all: said once at start
        if mode == "polling":
            root.watches.append((self._polling, self._polling.schedule(handler, str(root.path), recursive=True,
                                                                       event_filter=_EVENT_FILTER)))
            log.info("%s folder %s (%s) is polled every %g s (watch.mode: %s)", root.area, root.path, fs.name,
                     self._config.poll_interval_seconds, self._config.mode)
        root.identity, root.mode, root.handler = identity, mode, handler
        for each in ("events", "polling"):
            self._metrics.watch_mode.labels(folder=root.area, mode=each).set(1 if each == mode else 0)

    def _unwatch(self, root: _Root) -> None:
        for observer, watch in root.watches:
            try:
                observer.unschedule(watch)
            except (KeyError, OSError):
                pass  # its emitter already stopped itself (a deleted root)
        root.watches.clear()
        root.polled.clear()
        root.identity = None

    def _poll_unwatched(self) -> None:
        """Poll each folder inotify could not watch (the watch limit), unless a polled folder holds it."""
        with self._lock:
            failed, self._unwatched = sorted(set(self._unwatched), key=lambda p: len(p.parts)), []
        for path in failed:
            root = next((r for r in self._roots if path.is_relative_to(r.path) and path != r.path), None)
            if root is None or root.mode != "events" or root.handler is None or not path.is_dir():
                continue  # a root itself is handled by _watch; a polled one needs no watches
            if any(path.is_relative_to(p) for p in root.polled):
                continue
            reason, hint = limit_hint(OSError(errno.ENOSPC, "inotify watch limit reached"))
            log.error("cannot watch %s: %s; that folder is polled every %g s instead", path, hint,
                      self._config.poll_interval_seconds)
            self._metrics.watch_errors.labels(reason=reason).inc()
            try:
                root.watches.append((self._polling, self._polling.schedule(root.handler, str(path), recursive=True,
                                                                           event_filter=_EVENT_FILTER)))
            except OSError:
                continue  # gone meanwhile
            root.polled.append(path)
            self.rescan_needed.set()  # what arrived in it before polling began
