"""The pipeline worker thread: turns file events into catalog updates (classes) and classifications (inbox).

It owns the pending sets and the files waiting for a first model, and alone calls the inbox processor. Training
files that are due go to the caching thread (`Backfill`), which indexes them in the background: an inbox
file is never queued behind a backlog of training images (the two share the engine in turns). Its first
turn is the reconcile scan, so a start-up is ready (the last model serving) before the scan has run. Each
turn costs what changed: due files come off a deadline heap, counts are kept, not recounted; a flood of
training-file events (10,000 files copied in) is handled a slice per turn, after the inbox's. A `STOP`
sentinel on the queue ends it (and the caching thread) after the work in hand: the inbox batches begun and the
training chunk being cached; files not begun stay where they are, for the next start's scan.

A batch that fails (a bug, a full disk, a decoder that raises) is tried again file by file, so one bad file
never holds back the others; files that fail alone are taken again later, with a growing delay. Any other
failure is logged and mended by a rescan soon after: nothing ends the thread but `STOP`."""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from daemon.backfill import Backfill, guarded
from daemon.config import Config
from daemon.events import EventKind, FileEvent
from daemon.ignore import IgnoreRules, below
from daemon.inbox import InboxProcessor, PreparedBatch
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
_CACHED = object()  # the caching thread ran out of work: update `idle` now


class _Retry:
    """Training files the caching thread could not index, handed back to be taken again later."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths


_FIRST_RETRY_SECONDS, _MAX_RETRY_SECONDS = 0.5, 60.0
_RESCAN_AFTER_FAILURE_SECONDS = 5.0
_SCAN_SLICE_SECONDS = 0.05  # of each turn a scan may take: inbox files go on meanwhile
_LATER_PER_TURN = 500  # training-file events handled per turn (a flood of them must not hold up the inbox)
#: Inbox batches begun (decoding, then embedding) before the oldest is finished: one being finished, one in
#: the engine, one decoding; the third absorbs a finish slower than a forward batch
_AHEAD_BATCHES = 3
#: Inbox files that may join a turn as they arrive: then the turn ends and the loop's other work gets its go
_JOIN_PER_TURN = 2048


class Progress(Protocol):
    """What the pipeline and caching threads report as they go (the service turns it into a progress bar,
    the STATUS line and the systemd watchdog's pings)."""

    def went_round(self) -> None:
        """The daemon is not hung: called every pipeline loop (at least every half second) while the caching
        thread has nothing outstanding, else after every chunk it caches."""

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
        progress: Progress, on_backlog: Callable[[int], None],
    ) -> None:
        super().__init__(name="retraind-pipeline", daemon=False)
        self._config, self._events, self._hooks, self._store = config, events, hooks, store
        self._indexer, self._inbox, self._journal, self._metrics = indexer, inbox, journal, metrics
        self._rescan_needed = rescan_needed
        self._classes, self._inbox_root = config.folder("classes"), config.folder("inbox")
        self._ignore = IgnoreRules(config.watch.ignore)
        self._pending = {area: PendingFiles(config.watch.settle_seconds) for area in ("classes", "inbox")}
        self._waiting: set[Path] = set()
        self._attempts: dict[Path, int] = {}  # failures in a row, for the retry delay
        self._next_rescan = math.inf
        self._scanning: Iterator[FileEvent] | None = None  # the reconcile scan under way
        self._later: collections.deque[FileEvent] = collections.deque()  # training-file events not handled yet
        self._held: list[object] = []  # `STOP`, taken off the queue inside a turn: the loop's next item
        self._progress = progress
        self.idle = threading.Event()  # set whenever nothing is pending (tests and benches wait on it)
        self.inbox_waiting = 0  # inbox files not yet classified (set by the worker, read by any thread)
        self._on_backlog = on_backlog  # training files seen and not yet cached: the trainer waits for 0
        self.backfill = Backfill(indexer, progress, metrics, self._hand_back, lambda: self._notify(_CACHED))
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retraind-inbox-ahead")

    def start(self) -> None:
        self._on_backlog(1)  # unknown until the first scan has run: no training before it
        self.backfill.start()
        try:
            super().start()
        except BaseException:  # the OS refused the thread: the app stops only a pipeline that runs
            self.backfill.stop()
            self.backfill.join()
            raise

    def _notify(self, item: object) -> None:
        """From the caching thread: never block on a full queue (the pipeline may be stopping)."""
        try:
            self._events.put_nowait(item)
        except queue.Full:
            self._rescan_needed.set()  # a file that could not be indexed is found again by the scan

    def _hand_back(self, paths: list[Path]) -> None:
        self._notify(_Retry(paths))

    def rescan(self) -> None:
        """Start a reconcile scan (also the first turn after start-up); each turn handles a slice of it."""
        self._rescan_needed.clear()
        interval = self._config.watch.rescan_interval_seconds
        self._next_rescan = time.monotonic() + interval if interval else math.inf
        ignored = self._ignore.name
        self._scanning = itertools.chain(scan_inbox(self._inbox_root, ignored),  # the small, urgent one first
                                         scan_classes(self._classes, self._store, self._indexer.backbone_id, ignored))

    def _scan_slice(self) -> None:
        """Handle what the scan finds for up to `_SCAN_SLICE_SECONDS`, then let the turn go on."""
        if self._scanning is None:
            return
        deadline = time.monotonic() + _SCAN_SLICE_SECONDS
        for event in self._scanning:
            self._handle(event)
            if time.monotonic() >= deadline:
                return
        self._scanning = None

    def run(self) -> None:
        try:
            self.rescan()
            self._loop()
        finally:
            self._ahead.shutdown(wait=True, cancel_futures=True)
            self.backfill.stop()
            self.backfill.join()

    def _loop(self) -> None:
        while True:
            for item in self._drain():  # everything but training-file events, which wait in `_later`
                if item is STOP:  # the turns before it finished their work; what is still due stays put
                    return
                self._safely(self._dispatch, item)
            self._safely(self._process_due)  # inbox files first: they never wait behind a flood of events
            for _ in range(min(len(self._later), _LATER_PER_TURN)):
                self._safely(self._dispatch, self._later.popleft())
            if self._rescan_needed.is_set() or time.monotonic() >= self._next_rescan:
                self._safely(self.rescan)
            self._safely(self._scan_slice)
            self._safely(self._process_due)
            if not self.backfill.outstanding():  # else the caching thread reports, once per chunk done
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
                self._pending["inbox"].add(path, EventKind.CLOSED)
            self._waiting.clear()
        elif isinstance(item, _Retry):
            self._retry(item.paths, self._pending["classes"])
        elif isinstance(item, FileEvent):
            self._handle(item)

    def _drain(self, wait: bool = True) -> list[object]:
        """Take everything queued (waiting for a first item until the next deadline when nothing is in hand and
        `wait`); events of training files go to `_later` (handled a slice per turn, after the inbox), the rest
        (inbox events, control items) is returned in order."""
        items, self._held = self._held, []
        deadlines = [d for d in (p.next_deadline() for p in self._pending.values()) if d is not None]
        busy = not wait or items or self._scanning is not None or self._later
        timeout = 0.0 if busy else min([0.5, *(max(d, 0.01) for d in deadlines)])
        try:
            item = self._events.get(timeout=timeout)
            while True:
                if isinstance(item, FileEvent) and self._area(item.dest or item.path) == "classes":
                    self._later.append(item)
                else:
                    items.append(item)
                item = self._events.get_nowait()
        except queue.Empty:
            return items

    def _area(self, path: Path) -> str | None:
        if below(path, self._classes) is not None:
            return "classes"
        if below(path, self._inbox_root) is not None:
            return "inbox"
        return None

    def _handle(self, event: FileEvent) -> None:
        self._hooks.on_file_event(event)
        if event.kind in (EventKind.DELETED, EventKind.MOVED):
            self._forget(event.path)
        if event.kind is EventKind.MOVED and event.dest is not None:
            targets = list(walk_files(event.dest, self._ignore.name)) if event.dest.is_dir() else [event.dest]
            for path in targets:
                self._take(path, EventKind.MOVED)
        elif event.kind is not EventKind.DELETED:
            self._take(event.path, event.kind)

    def _forget(self, path: Path) -> None:
        for pending in self._pending.values():
            pending.discard(path)
        self._waiting.discard(path)
        self._attempts.pop(path, None)
        if self._area(path) == "classes":
            self.backfill.forget(path)

    def _take(self, path: Path, kind: EventKind) -> None:
        area = self._area(path)
        if area is None or path in self._waiting:
            return
        root = self._classes if area == "classes" else self._inbox_root
        if not self._ignore.path(path, root) and self._hooks.accept_path(path, area):
            self._pending[area].add(path, kind)

    def _process_due(self) -> None:
        classes = self._pending["classes"].due()
        if classes:
            self.backfill.index(classes)
        self._classify_due(self._pending["inbox"].due())
        self._inbox.flush_log()
        if self._journal.recovery_due():
            self._journal.recover()  # finishes moves and records that failed before (full disk, read-only)
        self.inbox_waiting = len(self._pending["inbox"]) + len(self._waiting)
        self._metrics.inbox_pending.set(self.inbox_waiting)
        backlog = (len(self._pending["classes"]) + self.backfill.outstanding() + len(self._later)
                   + (self._scanning is not None))
        self._on_backlog(backlog)
        if backlog or len(self._pending["inbox"]):
            self.idle.clear()
        else:
            self.idle.set()

    def _classify_due(self, paths: list[Path]) -> None:
        """Inbox files in backbone-sized batches, streamed: up to `_AHEAD_BATCHES` batches are begun (read and
        decoded on the decoding pool, then embedded on `_ahead`) while the oldest one's files are moved and
        recorded, and inbox files that become due meanwhile (a burst still arriving) join the stream instead
        of waiting for the next turn. In a burst the first results land after one forward batch, the engine
        waits neither for a batch's decoding nor for a slow finish (an fsync behind another process's writes),
        and the durable writes cost no engine time."""
        size = self._config.backbone.batch_size
        todo = collections.deque(paths)
        flight: collections.deque[tuple[Future[PreparedBatch], list[Path]]] = collections.deque()
        taken = set(paths)  # not finished yet: a name due again meanwhile (a file renamed onto it) waits
        joined = 0
        while todo or flight:
            while todo and len(flight) < _AHEAD_BATCHES:
                batch = [todo.popleft() for _ in range(min(size, len(todo)))]
                flight.append((self._begin(batch), batch))
            prepared, batch = flight.popleft()
            self._guarded(functools.partial(self._finish, prepared, batch), batch)
            taken.difference_update(batch)
            self._progress.went_round()
            arrived = self._arrived(take=joined < _JOIN_PER_TURN)
            if STOP in self._held:
                todo.clear()  # the batches begun are finished; the rest waits in the inbox for the next start
            for path in arrived:
                if path in taken:
                    self._pending["inbox"].retry(path, _FIRST_RETRY_SECONDS)
                else:
                    taken.add(path)
                    todo.append(path)
                    joined += 1

    def _arrived(self, take: bool) -> list[Path]:
        """Inbox files due now (when `take`), from the events queued since the turn began (training-file
        events go to `_later` as in every turn). Once `STOP` has come (held for the loop, which then ends)
        none are taken."""
        for item in self._drain(wait=False):
            if item is STOP:
                self._held.append(item)
            else:
                self._safely(self._dispatch, item)
        return self._pending["inbox"].due() if take and STOP not in self._held else []

    def _begin(self, batch: list[Path]) -> Future[PreparedBatch]:
        """`batch` begun (its decoding queued behind the batches begun before it) and then embedded on `_ahead`;
        a failure to begin it is the future's, so that the batch is tried file by file like any failed one."""
        try:
            begun = self._inbox.begin(batch)
        except Exception as exc:  # noqa: BLE001 - re-raised by the future's result(), inside `_guarded`
            failed: Future[PreparedBatch] = Future()
            failed.set_exception(exc)
            return failed
        return self._ahead.submit(self._inbox.prepare, begun)

    def _finish(self, prepared: Future[PreparedBatch], batch: list[Path], paths: list[Path]) -> list[Path]:
        """The prepared `batch` when `paths` is it; a file tried alone after its batch failed, afresh."""
        outcome = self._inbox.finish(prepared.result()) if paths == batch else self._inbox.process(paths)
        self._waiting.update(outcome.waiting)
        return outcome.retry

    def _guarded(self, work: Callable[[list[Path]], list[Path]], paths: list[Path]) -> None:
        """Run `work` on a batch (file by file if it fails); retry what is left."""
        retry = guarded(work, paths, self._metrics, self._attempts)
        for path in set(paths) - set(retry):
            self._attempts.pop(path, None)
        self._retry(retry, self._pending["inbox"])

    def _retry(self, paths: list[Path], pending: PendingFiles) -> None:
        """Take `paths` again later, the delay doubling with each failure in a row."""
        for path in paths:
            attempts = self._attempts[path] = self._attempts.get(path, 0) + 1
            pending.retry(path, min(_MAX_RETRY_SECONDS, _FIRST_RETRY_SECONDS * 2 ** (attempts - 1)))
