"""The pipeline worker thread: turns file events into catalog updates (classes) and classifications (inbox).

It owns the pending set and the files waiting for a first model; it alone calls the indexer and the inbox
processor, so neither needs locks. A `STOP` sentinel on the queue ends it after the work in hand.

A batch that fails (a bug, a full disk, a decoder that raises) is tried again file by file, so one bad file
never holds back the others; files that fail alone are taken again later, with a growing delay. Any other
failure is logged and mended by a rescan soon after: nothing ends the thread but `STOP`."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from daemon.config import Config
from daemon.events import EventKind, FileEvent
from daemon.inbox import InboxProcessor
from daemon.indexer import TrainingIndexer
from daemon.journal import InboxJournal
from daemon.metrics import Metrics
from daemon.pending import PendingFiles
from daemon.plugin_manager import Hooks
from daemon.scanner import scan_classes, scan_inbox, walk_files
from daemon.store import Store

log = logging.getLogger(__name__)

STOP = object()
MODEL_CHANGED = object()
_CHUNK = 256
_FIRST_RETRY_SECONDS, _MAX_RETRY_SECONDS = 0.5, 60.0
_RESCAN_AFTER_FAILURE_SECONDS = 5.0


class Progress(Protocol):
    """What the pipeline worker reports as it goes, on its own thread (the service turns it into a progress
    bar, the STATUS line and the systemd watchdog's pings)."""

    def went_round(self) -> None:
        """The worker is not hung: called every loop (at least every half second) and after every chunk."""

    def indexed(self, indexed: int, waiting: int) -> None:
        """Training files: `indexed` just now, `waiting` still to index (0 when a run of work is done)."""


class NoProgress:
    """The `Progress` of a daemon nobody watches (tests, benches, embedding)."""

    def went_round(self) -> None:
        pass

    def indexed(self, indexed: int, waiting: int) -> None:
        pass


class Pipeline(threading.Thread):
    def __init__(
        self, config: Config, events: queue.Queue[object], hooks: Hooks, store: Store, indexer: TrainingIndexer,
        inbox: InboxProcessor, journal: InboxJournal, metrics: Metrics, rescan_needed: threading.Event,
        progress: Progress,
    ) -> None:
        super().__init__(name="retraind-pipeline", daemon=False)
        self._config, self._events, self._hooks, self._store = config, events, hooks, store
        self._indexer, self._inbox, self._journal, self._metrics = indexer, inbox, journal, metrics
        self._rescan_needed = rescan_needed
        self._classes, self._inbox_root = config.folder("classes"), config.folder("inbox")
        self._pending = PendingFiles(config.watch.settle_seconds)
        self._waiting: set[Path] = set()
        self._attempts: dict[Path, int] = {}  # failures in a row, for the retry delay
        self._next_rescan = math.inf
        self._progress = progress
        self.idle = threading.Event()  # set whenever nothing is pending (tests and benches wait on it)
        self.inbox_waiting = 0  # inbox files not yet classified (set by the worker, read by any thread)

    def rescan(self) -> None:
        """Queue every file a reconcile scan finds; also run at start-up."""
        self._rescan_needed.clear()
        interval = self._config.watch.rescan_interval_seconds
        self._next_rescan = time.monotonic() + interval if interval else math.inf
        for event in scan_classes(self._classes, self._store, self._indexer.backbone_id) + scan_inbox(self._inbox_root):
            self._handle(event)

    def run(self) -> None:
        stopping = False
        while not stopping:
            for item in self._drain():
                if item is STOP:
                    stopping = True
                else:
                    self._safely(self._dispatch, item)
            if self._rescan_needed.is_set() or time.monotonic() >= self._next_rescan:
                self._safely(self.rescan)
            self._safely(self._process_due)
            self._progress.went_round()

    def _safely(self, work: Callable[..., None], *args: object) -> None:
        try:
            work(*args)
        except Exception:
            log.exception("pipeline step failed; a rescan in %.0f s mends what it left", _RESCAN_AFTER_FAILURE_SECONDS)
            self._metrics.internal_error("pipeline_step")
            self._next_rescan = min(self._next_rescan, time.monotonic() + _RESCAN_AFTER_FAILURE_SECONDS)

    def _dispatch(self, item: object) -> None:
        if item is MODEL_CHANGED:
            for path in self._waiting:
                self._pending.add(path, EventKind.CLOSED)
            self._waiting.clear()
        elif isinstance(item, FileEvent):
            self._handle(item)

    def _drain(self) -> list[object]:
        deadline = self._pending.next_deadline()
        timeout = 0.5 if deadline is None else min(0.5, max(deadline, 0.01))
        try:
            items = [self._events.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(items) < 10_000:
            try:
                items.append(self._events.get_nowait())
            except queue.Empty:
                break
        return items

    def _area(self, path: Path) -> str | None:
        if path.is_relative_to(self._classes) and path != self._classes:
            return "classes"
        if path.is_relative_to(self._inbox_root) and path != self._inbox_root:
            return "inbox"
        return None

    def _handle(self, event: FileEvent) -> None:
        self._hooks.on_file_event(event)
        if event.kind in (EventKind.DELETED, EventKind.MOVED):
            self._forget(event.path)
        if event.kind is EventKind.MOVED and event.dest is not None:
            targets = list(walk_files(event.dest)) if event.dest.is_dir() else [event.dest]
            for path in targets:
                self._take(path, EventKind.MOVED)
        elif event.kind is not EventKind.DELETED:
            self._take(event.path, event.kind)

    def _forget(self, path: Path) -> None:
        self._pending.discard(path)
        self._waiting.discard(path)
        self._attempts.pop(path, None)
        if self._area(path) == "classes":
            self._indexer.forget(path)

    def _take(self, path: Path, kind: EventKind) -> None:
        area = self._area(path)
        if area is not None and path not in self._waiting and self._hooks.accept_path(path, area):
            self._pending.add(path, kind)

    def _process_due(self) -> None:
        due = self._pending.due()
        classes = [p for p in due if self._area(p) == "classes"]
        inbox = [p for p in due if self._area(p) == "inbox"]
        later = sum(1 for p in self._pending.paths() if self._area(p) == "classes") if classes else 0
        if classes:
            self._progress.indexed(0, len(classes) + later)
        for start in range(0, len(classes), _CHUNK):
            chunk = classes[start : start + _CHUNK]
            self._guarded(self._index, chunk)
            self._progress.indexed(len(chunk), len(classes) - start - len(chunk) + later)
            self._progress.went_round()  # a long start-up caching run is progress, not a hang: keep the watchdog fed
        # inbox files in backbone-sized batches: each batch's files are finished before the next is read, so
        # in a burst the first results land after one forward batch, not after a 256-file chunk
        size = self._config.backbone.batch_size
        for start in range(0, len(inbox), size):
            self._guarded(self._classify, inbox[start : start + size])
            self._progress.went_round()
        self._inbox.flush_log()
        if self._journal.recovery_due():
            self._journal.recover()  # finishes moves and records that failed before (full disk, read-only)
        pending_inbox = sum(1 for p in self._pending.paths() if self._area(p) == "inbox")
        self.inbox_waiting = pending_inbox + len(self._waiting)
        self._metrics.inbox_pending.set(self.inbox_waiting)
        if not len(self._pending):
            self.idle.set()
        else:
            self.idle.clear()

    def _index(self, paths: list[Path]) -> list[Path]:
        self._indexer.index(paths)
        return []

    def _classify(self, paths: list[Path]) -> list[Path]:
        outcome = self._inbox.process(paths)
        self._waiting.update(outcome.waiting)
        return outcome.retry

    def _guarded(self, work: Callable[[list[Path]], list[Path]], paths: list[Path]) -> None:
        """Run `work` on a batch, then alone on each file of a batch that failed; retry what is left."""
        try:
            retry = work(paths)
        except Exception:
            log.exception("a batch of %d files failed; trying them one by one", len(paths))
            self._metrics.internal_error("pipeline_batch")
            retry = list(paths) if len(paths) == 1 else self._one_by_one(work, paths)
        for path in set(paths) - set(retry):
            self._attempts.pop(path, None)
        for path in retry:
            attempts = self._attempts[path] = self._attempts.get(path, 0) + 1
            self._pending.retry(path, min(_MAX_RETRY_SECONDS, _FIRST_RETRY_SECONDS * 2 ** (attempts - 1)))

    def _one_by_one(self, work: Callable[[list[Path]], list[Path]], paths: list[Path]) -> list[Path]:
        retry: list[Path] = []
        for path in paths:
            try:
                retry += work([path])
            except Exception as exc:  # noqa: BLE001 - the batch's traceback is logged just before
                log.error("%s: failed (%s: %s); retried later", path, type(exc).__name__, exc)
                self._metrics.internal_error("pipeline_file")
                retry.append(path)
        return retry
