"""The inbox journal: an inbox file belongs to its journal entry from the moment the entry is written until its
records are; `recover()` finishes what a crash, a failed move or a failed sink left open.

The order is journal → move → sinks → fsync → journal done: a batch's moves and records are made durable
together (one pass over its files and folders, `daemon.atomic.GroupCommit`) before its entries close, so a
power cut anywhere before that leaves the entries open and recovery redoes what was lost. Recovery redoes the
move if it had not happened (or the removal of a source a cross-file-system copy left behind), then the
idempotent sinks. It runs at start-up and, with a growing delay, whenever a move or a sink failed with an I/O
error (a full disk, a read-only folder).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from daemon.atomic import GroupCommit, fsync_dir, move_atomic
from daemon.config import Config
from daemon.images import ImageRejected, read_image_file
from daemon.logs import short
from daemon.metrics import Metrics
from daemon.plugin_manager import Hooks
from daemon.results import ClassificationResult
from daemon.store import JournalEntry, Store

log = logging.getLogger(__name__)

_RECOVER_FIRST_SECONDS, _RECOVER_MAX_SECONDS = 1.0, 60.0


def _stored(path: Path) -> str:
    """Journal paths as JSON strings: a name that is not valid UTF-8 (a surrogate escape) survives SQLite."""
    return json.dumps(os.fspath(path))


def _loaded(text: str) -> Path:
    return Path(json.loads(text))


def file_identity(path: Path) -> str:
    """(st_dev, st_ino, st_ctime_ns) of the entry itself, as JSON; "" when it cannot be stat'ed."""
    try:
        st = os.lstat(path)
    except OSError:
        return ""
    return json.dumps([st.st_dev, st.st_ino, st.st_ctime_ns])


def _sha256_of(path: Path, max_bytes: int) -> str | None:
    """The sha256 of a regular file of at most `max_bytes`; None for anything else found under the name (a
    FIFO, a device, a folder, a file grown past the limit: none of them is the file a move wrote)."""
    try:
        return read_image_file(path, max_bytes).sha256
    except ImageRejected:
        return None


class InboxJournal:
    """Writes, recovers and closes journal entries; used only from the pipeline worker thread (and from the
    main thread at start-up, before the worker runs)."""

    def __init__(self, config: Config, store: Store, hooks: Hooks, metrics: Metrics) -> None:
        self._config, self._store, self._hooks, self._metrics = config, store, hooks, metrics
        self._recover_at: float | None = None
        self._recover_delay = _RECOVER_FIRST_SECONDS

    def open_sources(self) -> set[Path]:
        """Inbox files whose journal entry is open: they belong to recovery, not to a new classification."""
        return {_loaded(entry.source) for entry in self._store.journal_open()}

    def begin(self, results: list[ClassificationResult], backbone: str = "",
              bottlenecks: Sequence[tuple[str, str, np.ndarray]] = ()) -> list[JournalEntry]:
        """Journal `results` (their `destination` set) in one transaction, before their files are moved; the
        batch's new bottlenecks of `backbone` (sha256, variant, vector) are stored in the same commit."""
        entries = []
        for result in results:
            assert result.destination is not None, "a journal entry needs the destination"
            entries.append(JournalEntry(result.id, _stored(result.source), _stored(result.destination),
                                        json.dumps(result.record()), "moving", file_identity(result.source)))
        self._store.journal_begin_many(entries, backbone, bottlenecks)
        return entries

    def drop(self, entry: JournalEntry) -> None:
        """Close the entry of a file that left the inbox before its move (renamed or deleted by someone else):
        nothing is recorded for it. Left open, recovery found the file filed under its new name by the entry
        of that name, at this entry's destination, and recorded it a second time."""
        self._store.journal_finish(entry.id)

    def complete(self, done: list[tuple[JournalEntry, ClassificationResult]],
                 group: GroupCommit | None = None) -> list[bool]:
        """Run the sinks of each moved file, make their writes durable together with what `group` (the moves)
        already holds, then close the entries in one transaction: an entry is closed only once its move and
        records are on disk. An entry stays open (and is retried) if a sink failed with an I/O error, or all of
        them if the group commit failed. Returns, per entry, whether it was closed."""
        group = group or GroupCommit()
        with group.deferring():
            closed = [self._sinks_ran(result) for _, result in done]
        try:
            group.commit()
        except OSError as exc:
            log.error("the moves and records of %d inbox files could not be made durable (%s); retried later",
                      len(done), short(exc))
            self._metrics.internal_error("inbox_durable")
            self.schedule_recovery()
            return [False] * len(done)
        self._store.journal_finish_many([entry.id for (entry, _), ok in zip(done, closed) if ok])
        return closed

    def _sinks_ran(self, result: ClassificationResult) -> bool:
        errors = self._hooks.on_result(result, self._config)
        if any(isinstance(exc, OSError) for exc in errors):
            log.error("%s: a result record could not be written (%s); retried later", result.destination,
                      "; ".join(short(exc) for exc in errors))
            self.schedule_recovery()
            return False
        return True

    def schedule_recovery(self) -> None:
        """Try the open entries again after the current delay (1 s, doubling up to 60 s)."""
        if self._recover_at is None:
            self._recover_at = time.monotonic() + self._recover_delay
            self._recover_delay = min(self._recover_delay * 2, _RECOVER_MAX_SECONDS)

    def recovery_due(self) -> bool:
        return self._recover_at is not None and time.monotonic() >= self._recover_at

    def recover(self) -> int:
        """Finish the open journal entries (a crash, a failed move or sink); returns how many were open."""
        self._recover_at = None
        entries = self._store.journal_open()
        finished = 0
        for entry in entries:
            try:
                finished += self._recover_one(entry)
            except Exception as exc:
                log.error("%s: recovery failed (%s); retried later", _loaded(entry.source), short(exc))
                log.debug("recovery failure", exc_info=True)
                self._metrics.internal_error("journal_recovery")
        if finished == len(entries):
            self._recover_delay = _RECOVER_FIRST_SECONDS
        else:
            self.schedule_recovery()
        return len(entries)

    def _recover_one(self, entry: JournalEntry) -> bool:
        source, destination = _loaded(entry.source), _loaded(entry.destination)
        record = json.loads(entry.record)
        moved = os.path.lexists(destination) and _sha256_of(destination, self._config.watch.max_file_bytes) == record["sha256"]
        if not moved and (not os.path.lexists(source) or os.path.lexists(destination)):
            # gone meanwhile, or its name was taken: no record was written; a file left in the inbox is
            # classified afresh
            log.warning("%s: journal entry dropped (source present: %s)", source, os.path.lexists(source))
            self._store.journal_finish(entry.id)
            return True
        # a copy across file systems may have landed without its source being removed: remove it now, or the
        # next scan would classify the same file a second time. Only that very file (device, inode, ctime as
        # journaled): a new file dropped under its name is never deleted without a record.
        left_behind = (moved and bool(entry.source_stat) and file_identity(source) == entry.source_stat
                       and _sha256_of(source, self._config.watch.max_file_bytes) == record["sha256"])
        if (not moved and not self._redo_move(source, destination)) or (
                left_behind and not self._remove_copied_source(source, destination)):
            return False
        return self.complete([(entry, ClassificationResult.from_record(record, source, destination))])[0]

    def _redo_move(self, source: Path, destination: Path) -> bool:
        try:
            move_atomic(source, destination)
        except OSError as exc:
            log.error("%s: cannot move to %s (%s); retried later", source, destination.parent, short(exc))
            self._metrics.internal_error("journal_recovery")
            return False
        return True

    def _remove_copied_source(self, source: Path, destination: Path) -> bool:
        try:
            source.unlink()
            fsync_dir(source.parent)
        except OSError as exc:
            log.error("%s: already moved to %s but cannot be removed (%s); retried later", source,
                      destination.parent, short(exc))
            self._metrics.internal_error("journal_recovery")
            return False
        return True
