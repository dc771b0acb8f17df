"""Classifying inbox files: each ends in exactly one place with exactly one record, even across crashes, full
disks and read-only folders (the journal in `daemon/journal.py` makes that so).

A file that cannot be read is rejected only once it has been left alone for `watch.settle_seconds`: empty or
damaged content may be a file still being written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from daemon.atomic import GroupCommit, free_name, move_atomic, utf8_name, write_atomic
from daemon.burst_log import BurstLog
from daemon.config import Config
from daemon.extractor import Extraction, Extractor, Job
from daemon.ignore import below
from daemon.images import ImageRejected, read_image_file
from daemon.journal import InboxJournal
from daemon.logs import short
from daemon.metrics import OUTCOMES, Metrics
from daemon.plugin_manager import Hooks
from daemon.registry import ModelVersion
from daemon.results import ClassificationResult
from daemon.serving import ServingModel
from daemon.store import JournalEntry
from daemon.trust import Judgement, judge

log = logging.getLogger(__name__)
CLASSIFIED, REVIEW = OUTCOMES


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class InboxOutcome:
    """What `process` could not finish: `waiting` for a first model, `retry` later (still changing, I/O)."""

    waiting: list[Path] = field(default_factory=list)
    retry: list[Path] = field(default_factory=list)


@dataclass
class PreparedBatch:
    """Inbox files on their way to a result: `begin` has submitted their reading and decoding (`jobs`, in the
    order of `submitted`), `prepare` has embedded them (`extraction`); not yet moved. `version` None: no
    model yet."""

    paths: list[Path]
    version: ModelVersion | None
    submitted: list[Path] = field(default_factory=list)
    jobs: list[Future[Job]] = field(default_factory=list)
    extraction: Extraction = field(default_factory=Extraction)
    #: files whose name an open journal entry still holds: tried again once recovery has finished that entry
    journaled: list[Path] = field(default_factory=list)


class InboxProcessor:
    def __init__(
        self, config: Config, journal: InboxJournal, extractor: Extractor, serving: ServingModel, hooks: Hooks,
        metrics: Metrics,
    ) -> None:
        self._config, self._journal, self._extractor = config, journal, extractor
        self._serving, self._hooks, self._metrics = serving, hooks, metrics
        self._lines = BurstLog(log, "inbox files classified")

    def process(self, paths: list[Path]) -> InboxOutcome:
        """Classify `paths`. A file whose name an open journal entry still holds belongs to recovery until that
        entry is finished: it is tried again later (it may be a new file dropped under the same name)."""
        return self.finish(self.prepare(self.begin(paths)))

    def begin(self, paths: list[Path]) -> PreparedBatch:
        """Start reading, hashing and decoding a batch on the inbox decoding pool and return at once (no journal
        entry, no move). Its files are decoded and embedded as the serving model was trained (its backbone id:
        another preprocessing version while the store is re-cached under the configured one). The pipeline begins the next batch while this one is embedded: its files are
        decoded while the engine runs, not after (the engine waited 30-45 ms of each 0.23 s batch for them)."""
        version = self._serving.version
        if version is None:
            return PreparedBatch(list(paths), None)
        journaled = self._journal.open_sources()
        batch = PreparedBatch(list(paths), version)
        limit = self._config.watch.max_file_bytes
        for path in paths:
            if not os.path.lexists(path):
                continue
            (batch.journaled if path in journaled else batch.submitted).append(path)
        batch.jobs = self._extractor.running_as(version.backbone).submit(
            [(str(path), functools.partial(read_image_file, path, limit)) for path in batch.submitted], urgent=True)
        return batch

    def prepare(self, batch: PreparedBatch) -> PreparedBatch:
        """Embed a begun batch (any thread): the pipeline prepares the next batch while it finishes this one,
        so the forward pass overlaps the moves and durable writes."""
        if batch.version is not None:
            batch.extraction = self._extractor.running_as(batch.version.backbone).gather(batch.jobs, urgent=True,
                                                                                         keep=False)
            batch.jobs = []
        return batch

    def finish(self, batch: PreparedBatch) -> InboxOutcome:
        """Journal, move and record each file of a prepared batch (the pipeline thread)."""
        if batch.version is None:
            return InboxOutcome(waiting=batch.paths)
        outcome = InboxOutcome(retry=list(batch.journaled))
        routed: list[tuple[ClassificationResult, float]] = []
        taken: set[Path] = set()  # destinations given in this batch, before any of its files is moved
        made: set[Path] = set()  # folders made (or found) for this batch: one mkdir each, not one per file
        usable: list[tuple[Path, str]] = []
        extraction = batch.extraction
        for path in batch.submitted:
            problem = extraction.rejected.get(str(path))
            if problem is not None:
                self._reject(path, problem, outcome)
            else:
                usable.append((path, extraction.hashes[str(path)]))
        started = time.perf_counter()
        for (path, sha256), judged in zip(usable, self._judged(batch.version, usable, extraction)):
            result = self._routed(path, sha256, batch.version, judged, taken, made)
            if result is None:
                outcome.retry.append(path)  # its folder cannot be made
            else:
                routed.append((result, started))
        self._move_and_record(routed, batch.version.backbone, extraction.unstored)
        return outcome

    def _judged(self, version: ModelVersion, files: list[tuple[Path, str]], extraction: Extraction) -> list[Judgement]:
        """The batch's scores in one product each (head, novelty): row by row, the novelty score's 1280×1280
        product cost 0.17 ms of CPU per image on one thread, batched by 32 0.05 ms."""
        if not files:
            return []
        return judge(version, np.stack([extraction.vectors[sha256] for _, sha256 in files]), self._config.classify)

    def _move_and_record(self, routed: list[tuple[ClassificationResult, float]], backbone: str,
                         bottlenecks: list[tuple[str, str, np.ndarray]]) -> None:
        """Journal the batch and store its new bottlenecks (under `backbone`, the serving model's id: they were
        computed for it) in one commit, move each file, run the sinks, make the moves and records durable in
        one pass, close the entries (one commit). A file that cannot be moved stays in the inbox with its
        entry open: recovery retries the move."""
        if not routed:
            self._extractor.running_as(backbone).keep(bottlenecks)
            return
        entries = self._journal.begin([result for result, _ in routed], backbone, bottlenecks)
        self._extractor.stored(len(bottlenecks))
        moved: list[tuple[JournalEntry, ClassificationResult, float]] = []
        group = GroupCommit()  # the moves' folders are made durable with the records, before the entries close
        for entry, (result, started) in zip(entries, routed):
            assert result.destination is not None
            try:
                with group.deferring():
                    move_atomic(result.source, result.destination)
            except OSError as exc:
                if not os.path.lexists(result.source):  # moved or deleted meanwhile, by someone else
                    log.warning("%s: moved away or deleted before it was filed; not recorded (taken again where "
                                "it went, if that is in the inbox)", result.source)
                    self._journal.drop(entry)
                    continue
                log.error("%s: cannot move to %s (%s); it stays in the inbox and the move is retried",
                          result.source, result.destination.parent, short(exc))
                self._metrics.internal_error("inbox_move")
                self._journal.schedule_recovery()
                continue
            moved.append((entry, result, started))
        try:
            self._journal.complete([(entry, result) for entry, result, _ in moved], group)
        except Exception:
            self._journal.schedule_recovery()
            raise
        for _, result, started in moved:
            assert result.destination is not None
            self._count(result, result.destination.parent, started)

    def _routed(self, path: Path, sha256: str, version: ModelVersion, judged: Judgement,
                taken: set[Path], made: set[Path]) -> ClassificationResult | None:
        """The result for the file at `path`, with the free name in the folder a router chose as its
        destination; None (logged and counted) when that folder cannot be made."""
        result = ClassificationResult(
            id=uuid.uuid4().hex, source=path, sha256=sha256, top_k=judged.top_k, model_version=version.number,
            backbone=version.backbone, time=_now(), review_reason=judged.review_reason, novelty=judged.novelty,
        )
        folder = self._hooks.route_result(result, self._config)
        if folder is None:
            raise RuntimeError("no plugin routed the result (is the built-in file_sinks plugin disabled?)")
        try:
            if folder not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(folder)
        except OSError as exc:
            log.error("%s: cannot create %s (%s); it stays in the inbox and is retried", path, folder, short(exc))
            self._metrics.internal_error("inbox_folder")
            return None
        destination = free_name(folder, path.name, sha256[:12], taken=taken)
        taken.add(destination)
        return dataclasses.replace(result, destination=destination)

    def _count(self, result: ClassificationResult, folder: Path, started: float) -> None:
        outcome = REVIEW if folder == self._config.folder("review") else CLASSIFIED
        if outcome == REVIEW and result.review_reason is not None:
            self._metrics.reviews.labels(reason=result.review_reason).inc()
        self._metrics.classifications.labels(label=result.label, outcome=outcome).inc()
        self._metrics.confidence.observe(result.confidence)
        self._metrics.classification_seconds.labels(stage="route").observe(time.perf_counter() - started)
        self._announce(result)

    def _announce(self, result: ClassificationResult) -> None:
        """`cat.jpg -> red (0.973) -> outbox/red/cat.jpg` (`(0.412, low_confidence)` for a review), summed up
        per destination during a burst."""
        destination = result.destination or result.source
        shown = below(destination, self._config.data_root) or os.fspath(destination)
        why = f", {result.review_reason}" if result.review_reason else ""
        self._lines.info(os.path.dirname(shown) or ".", "%s -> %s (%.3f%s) -> %s", result.source.name,
                         result.label, result.confidence, why, shown)

    def flush_log(self) -> None:
        """Log the summary of a burst whose window has ended (the pipeline calls this every loop)."""
        self._lines.flush()

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
            record = {"file": utf8_name(path.name), "reason": problem.reason, "error": utf8_name(str(problem)),
                      "time": _now()}  # valid UTF-8 whatever the name's bytes, as a result's record
            write_atomic(record_path, json.dumps(record).encode())
            move_atomic(path, destination)
        except OSError as exc:
            log.error("%s: cannot move to %s (%s); it stays in the inbox and is retried", path, folder, short(exc))
            self._metrics.internal_error("inbox_reject")
            if record_path is not None:
                record_path.unlink(missing_ok=True)
            return False
        log.warning("%s: rejected (%s): %s", path, problem.reason, problem)
        self._metrics.rejected.labels(reason=problem.reason).inc()
        self._hooks.on_rejected(destination, problem.reason, str(problem))
        return True
