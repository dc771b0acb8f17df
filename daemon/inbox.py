"""Classifying inbox files: each ends in exactly one place with exactly one record, even across crashes, full
disks and read-only folders.

The order is journal → move → sinks → journal done. From the moment its journal entry is written a file
belongs to that entry: `recover()` finishes it (the move if it had not happened, then the idempotent sinks),
at start-up after a crash, and later, with a growing delay, when a move or a sink failed with an I/O error.
A file that cannot be read is rejected only once it has been left alone for `watch.settle_seconds`: empty or
damaged content may be a file still being written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from daemon.atomic import free_name, fsync_dir, move_atomic, write_atomic
from daemon.config import Config
from daemon.extractor import Extractor
from daemon.images import ImageFile, ImageRejected, read_image_file
from daemon.metrics import Metrics
from daemon.plugin_manager import Hooks
from daemon.registry import ModelVersion
from daemon.results import ClassificationResult
from daemon.serving import ServingModel
from daemon.store import JournalEntry, Store
from daemon.trust import judge

log = logging.getLogger(__name__)

_RECOVER_FIRST_SECONDS, _RECOVER_MAX_SECONDS = 1.0, 60.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _stored(path: Path) -> str:
    """Journal paths as JSON strings: a name that is not valid UTF-8 (a surrogate escape) survives SQLite."""
    return json.dumps(os.fspath(path))


def _loaded(text: str) -> Path:
    return Path(json.loads(text))


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class InboxOutcome:
    """What `process` could not finish: `waiting` for a first model, `retry` later (still changing, I/O)."""

    waiting: list[Path] = field(default_factory=list)
    retry: list[Path] = field(default_factory=list)


class InboxProcessor:
    def __init__(
        self, config: Config, store: Store, extractor: Extractor, serving: ServingModel, hooks: Hooks,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._store = store
        self._extractor = extractor
        self._serving = serving
        self._hooks = hooks
        self._metrics = metrics
        self._recover_at: float | None = None
        self._recover_delay = _RECOVER_FIRST_SECONDS

    def process(self, paths: list[Path]) -> InboxOutcome:
        """Classify `paths` (files already in the journal belong to `recover` and are left alone)."""
        version = self._serving.version
        if version is None:
            return InboxOutcome(waiting=list(paths))
        outcome = InboxOutcome()
        journaled = {_loaded(entry.source) for entry in self._store.journal_open()}
        files: list[ImageFile] = []
        for path in paths:
            if path in journaled or not os.path.lexists(path):
                continue
            try:
                files.append(read_image_file(path, self._config.watch.max_file_bytes))
            except ImageRejected as exc:
                self._reject(path, exc, outcome)
        extraction = self._extractor.extract(files)
        for f in files:
            problem = extraction.rejected.get(str(f.path))
            if problem is not None:
                self._reject(f.path, problem, outcome)
            elif not self._classify_one(f, version, extraction.vectors[f.sha256]):
                outcome.retry.append(f.path)
        return outcome

    def _classify_one(self, f: ImageFile, version: ModelVersion, vector: np.ndarray) -> bool:
        """Journal, move and sink one file; False when it must be tried again (its folder cannot be made)."""
        started = time.perf_counter()
        (judged,) = judge(version, vector[None, :], self._config.classify)
        result = ClassificationResult(
            id=uuid.uuid4().hex, source=f.path, sha256=f.sha256, top_k=judged.top_k, model_version=version.number,
            backbone=version.backbone, time=_now(), review_reason=judged.review_reason, novelty=judged.novelty,
        )
        folder = self._hooks.route_result(result, self._config)
        if folder is None:
            raise RuntimeError("no plugin routed the result (is the built-in file_sinks plugin disabled?)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("%s: cannot create %s (%s); it stays in the inbox and is retried", f.path, folder, exc)
            return False
        destination = free_name(folder, f.path.name, f.sha256[:12])
        result = ClassificationResult(**{**result.__dict__, "destination": destination})
        entry = JournalEntry(result.id, _stored(f.path), _stored(destination), json.dumps(result.record()),
                             "moving")
        self._store.journal_begin(entry)
        try:
            move_atomic(f.path, destination)
        except OSError as exc:
            log.error("%s: cannot move to %s (%s); it stays in the inbox and the move is retried",
                      f.path, folder, exc)
            self._schedule_recovery()
            return True
        try:
            self._finish(entry, result)
        except Exception:
            self._schedule_recovery()
            raise
        outcome = "review" if folder == self._config.folder("review") else "classified"
        if outcome == "review" and result.review_reason is not None:
            self._metrics.reviews.labels(reason=result.review_reason).inc()
        self._metrics.classifications.labels(label=result.label, outcome=outcome).inc()
        self._metrics.confidence.observe(result.confidence)
        self._metrics.classification_seconds.labels(stage="route").observe(time.perf_counter() - started)
        return True

    def _finish(self, entry: JournalEntry, result: ClassificationResult) -> bool:
        """Run the sinks; the entry stays open (and is retried) if one failed with an I/O error."""
        errors = self._hooks.on_result(result, self._config)
        if any(isinstance(exc, OSError) for exc in errors):
            log.error("%s: a result record could not be written (%s); retried later", result.destination,
                      "; ".join(str(exc) for exc in errors))
            self._schedule_recovery()
            return False
        self._store.journal_finish(entry.id)
        return True

    def _reject(self, path: Path, problem: ImageRejected, outcome: InboxOutcome) -> None:
        if self._may_still_change(path) or not self.reject(path, problem):
            outcome.retry.append(path)

    def _may_still_change(self, path: Path) -> bool:
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return False
        return abs(time.time() - mtime) < self._config.watch.settle_seconds

    def reject(self, path: Path, problem: ImageRejected) -> bool:
        """Move an unusable file to `rejected/` beside an `<name>.error.json` record saying why; False (and
        the file left in place) when that fails."""
        folder = self._config.folder("rejected")
        tag = hashlib.sha256(os.fsencode(path) + str(time.time_ns()).encode()).hexdigest()[:12]
        record_path: Path | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            destination = free_name(folder, path.name, tag)
            record_path = destination.with_name(destination.name + ".error.json")
            record = {"file": path.name, "reason": problem.reason, "error": str(problem), "time": _now()}
            write_atomic(record_path, json.dumps(record).encode())
            move_atomic(path, destination)
        except OSError as exc:
            log.error("%s: cannot move to %s (%s); it stays in the inbox and is retried", path, folder, exc)
            if record_path is not None:
                record_path.unlink(missing_ok=True)
            return False
        log.warning("%s: rejected (%s): %s", path, problem.reason, problem)
        self._metrics.rejected.labels(reason=problem.reason).inc()
        self._hooks.on_rejected(destination, problem.reason, str(problem))
        return True

    # -- recovery ----------------------------------------------------------------------------------------

    def _schedule_recovery(self) -> None:
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
            except Exception:
                log.exception("%s: recovery failed; retried later", _loaded(entry.source))
        if finished == len(entries):
            self._recover_delay = _RECOVER_FIRST_SECONDS
        else:
            self._schedule_recovery()
        return len(entries)

    def _recover_one(self, entry: JournalEntry) -> bool:
        source, destination = _loaded(entry.source), _loaded(entry.destination)
        record = json.loads(entry.record)
        moved = os.path.lexists(destination) and _sha256_of(destination) == record["sha256"]
        if not moved:
            if not os.path.lexists(source) or os.path.lexists(destination):
                # gone meanwhile, or its name was taken: no record was written; a file left in the inbox is
                # classified afresh
                log.warning("%s: journal entry dropped (source present: %s)", source, os.path.lexists(source))
                self._store.journal_finish(entry.id)
                return True
            try:
                move_atomic(source, destination)
            except OSError as exc:
                log.error("%s: cannot move to %s (%s); retried later", source, destination.parent, exc)
                return False
        elif os.path.lexists(source) and _sha256_of(source) == record["sha256"]:
            # a copy across file systems landed but its source was not removed: remove it now, or the next
            # scan would classify the same file a second time
            try:
                source.unlink()
                fsync_dir(source.parent)
            except OSError as exc:
                log.error("%s: already moved to %s but cannot be removed (%s); retried later", source,
                          destination.parent, exc)
                return False
        result = ClassificationResult(
            id=record["id"], source=source, sha256=record["sha256"],
            top_k=tuple((item["label"], item["score"]) for item in record["top_k"]),
            model_version=record["model_version"], backbone=record["backbone"], time=record["time"],
            destination=destination, review_reason=record.get("review_reason"), novelty=record.get("novelty"),
        )
        return self._finish(entry, result)
