"""The pipeline worker thread: turns file events into catalog updates (classes) and classifications (inbox).

It owns the pending set and the files waiting for a first model; it alone calls the indexer and the inbox
processor, so neither needs locks. A `STOP` sentinel on the queue ends it after the work in hand."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from daemon.config import Config
from daemon.events import EventKind, FileEvent
from daemon.inbox import InboxProcessor
from daemon.indexer import TrainingIndexer
from daemon.metrics import Metrics
from daemon.pending import PendingFiles
from daemon.plugin_manager import Hooks
from daemon.scanner import scan_classes, scan_inbox, walk_files
from daemon.store import Store

log = logging.getLogger(__name__)

STOP = object()
MODEL_CHANGED = object()
_CHUNK = 256


class Pipeline(threading.Thread):
    def __init__(
        self, config: Config, events: queue.Queue[object], hooks: Hooks, store: Store, indexer: TrainingIndexer,
        inbox: InboxProcessor, metrics: Metrics, rescan_needed: threading.Event,
    ) -> None:
        super().__init__(name="retraind-pipeline", daemon=False)
        self._config, self._events, self._hooks, self._store = config, events, hooks, store
        self._indexer, self._inbox, self._metrics = indexer, inbox, metrics
        self._rescan_needed = rescan_needed
        self._classes, self._inbox_root = config.folder("classes"), config.folder("inbox")
        self._pending = PendingFiles(config.watch.settle_seconds)
        self._waiting: set[Path] = set()
        self._next_rescan = time.monotonic() + config.watch.rescan_interval_seconds
        self.idle = threading.Event()  # set whenever nothing is pending (tests and benches wait on it)
        self.on_loop: Callable[[], None] = lambda: None  # the main loop's watchdog ping hangs here

    def rescan(self) -> None:
        """Queue every file a reconcile scan finds; also run at start-up."""
        self._rescan_needed.clear()
        self._next_rescan = time.monotonic() + self._config.watch.rescan_interval_seconds
        for event in scan_classes(self._classes, self._store, self._indexer.backbone_id) + scan_inbox(self._inbox_root):
            self._handle(event)

    def run(self) -> None:
        stopping = False
        while not stopping:
            for item in self._drain():
                if item is STOP:
                    stopping = True
                elif item is MODEL_CHANGED:
                    for path in self._waiting:
                        self._pending.add(path, closed=True)
                    self._waiting.clear()
                elif isinstance(item, FileEvent):
                    self._handle(item)
            interval = self._config.watch.rescan_interval_seconds
            if self._rescan_needed.is_set() or (interval and time.monotonic() >= self._next_rescan):
                self.rescan()
            self._process_due()
            self.on_loop()

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
                self._take(path, closed=True)
        elif event.kind is not EventKind.DELETED:
            self._take(event.path, closed=event.kind is EventKind.CLOSED)

    def _forget(self, path: Path) -> None:
        self._pending.discard(path)
        self._waiting.discard(path)
        if self._area(path) == "classes":
            self._indexer.forget(path)

    def _take(self, path: Path, closed: bool) -> None:
        area = self._area(path)
        if area is not None and path not in self._waiting and self._hooks.accept_path(path, area):
            self._pending.add(path, closed)

    def _process_due(self) -> None:
        due = self._pending.due()
        classes = [p for p in due if self._area(p) == "classes"]
        inbox = [p for p in due if self._area(p) == "inbox"]
        for start in range(0, len(classes), _CHUNK):
            self._guarded(self._indexer.index, classes[start : start + _CHUNK])
        for start in range(0, len(inbox), _CHUNK):
            self._guarded(self._classify, inbox[start : start + _CHUNK])
        pending_inbox = sum(1 for p in self._pending.paths() if self._area(p) == "inbox")
        self._metrics.inbox_pending.set(pending_inbox + len(self._waiting))
        if not len(self._pending):
            self.idle.set()
        else:
            self.idle.clear()

    def _classify(self, paths: list[Path]) -> None:
        self._waiting.update(self._inbox.process(paths))

    @staticmethod
    def _guarded(work: Callable[[list[Path]], None], paths: list[Path]) -> None:
        """A bug or an I/O error in one batch is logged; its files are found again by the next rescan."""
        try:
            work(paths)
        except Exception:
            log.exception("pipeline batch failed; its files will be retried by the next rescan")
