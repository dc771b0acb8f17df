"""Classifying inbox files: each ends in exactly one place with exactly one record, even across crashes.

The order is journal → move → sinks → journal done. After a crash, `recover()` finishes what the journal
holds: the move if it had not happened, then the (idempotent) sinks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from daemon.atomic import free_name, move_atomic, write_atomic
from daemon.config import Config
from daemon.extractor import Extractor
from daemon.images import ImageFile, ImageRejected, read_image_file
from daemon.metrics import Metrics
from daemon.plugin_manager import Hooks
from daemon.registry import ModelVersion
from daemon.results import ClassificationResult
from daemon.serving import ServingModel
from daemon.store import JournalEntry, Store

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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

    def process(self, paths: list[Path]) -> list[Path]:
        """Classify `paths`; returns those that must wait because no model is serving yet."""
        version = self._serving.version
        if version is None:
            return paths
        files: list[ImageFile] = []
        for path in paths:
            try:
                files.append(read_image_file(path, self._config.watch.max_file_bytes))
            except ImageRejected as exc:
                self.reject(path, exc)
        extraction = self._extractor.extract(files)
        for f in files:
            problem = extraction.rejected.get(str(f.path))
            if problem is not None:
                self.reject(f.path, problem)
            else:
                self._classify_one(f, version, extraction.vectors[f.sha256])
        return []

    def _classify_one(self, f: ImageFile, version: ModelVersion, vector: object) -> None:
        started = time.perf_counter()
        (top_k,) = self._serving.top_k(version, vector[None, :], self._config.classify.top_k)  # type: ignore[index]
        result = ClassificationResult(
            id=uuid.uuid4().hex, source=f.path, sha256=f.sha256, top_k=top_k, model_version=version.number,
            backbone=version.backbone, time=_now(),
        )
        folder = self._hooks.route_result(result, self._config)
        if folder is None:
            raise RuntimeError("no plugin routed the result (is the built-in file_sinks plugin disabled?)")
        folder.mkdir(parents=True, exist_ok=True)
        destination = free_name(folder, f.path.name, f.sha256[:12])
        result = ClassificationResult(**{**result.__dict__, "destination": destination})
        entry = JournalEntry(result.id, str(f.path), str(destination), json.dumps(result.record()), "moving")
        self._store.journal_begin(entry)
        try:
            move_atomic(f.path, destination)
        except OSError as exc:
            self._store.journal_finish(entry.id)
            log.error("%s: cannot move to %s (%s); it stays in the inbox and is retried", f.path, folder, exc)
            return
        self._finish(entry, result)
        outcome = "review" if folder == self._config.folder("review") else "classified"
        self._metrics.classifications.labels(label=result.label, outcome=outcome).inc()
        self._metrics.confidence.observe(result.confidence)
        self._metrics.classification_seconds.labels(stage="route").observe(time.perf_counter() - started)

    def _finish(self, entry: JournalEntry, result: ClassificationResult) -> None:
        self._hooks.on_result(result, self._config)
        self._store.journal_finish(entry.id)

    def reject(self, path: Path, problem: ImageRejected) -> None:
        """Move an unusable file to `rejected/` beside an `<name>.error.json` record saying why."""
        folder = self._config.folder("rejected")
        folder.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(str(path).encode() + str(time.time_ns()).encode()).hexdigest()[:12]
        destination = free_name(folder, path.name, tag)
        record = {"file": path.name, "reason": problem.reason, "error": str(problem), "time": _now()}
        try:
            write_atomic(destination.with_name(destination.name + ".error.json"), json.dumps(record).encode())
            move_atomic(path, destination)
        except OSError as exc:
            log.error("%s: cannot move to %s (%s); it stays in the inbox and is retried", path, folder, exc)
            return
        log.warning("%s: rejected (%s): %s", path, problem.reason, problem)
        self._metrics.rejected.labels(reason=problem.reason).inc()
        self._hooks.on_rejected(destination, problem.reason, str(problem))

    def recover(self) -> int:
        """Finish journal entries a crash interrupted; returns how many there were."""
        entries = self._store.journal_open()
        for entry in entries:
            source, destination = Path(entry.source), Path(entry.destination)
            if source.exists() and not destination.exists():
                move_atomic(source, destination)
            record = json.loads(entry.record)
            result = ClassificationResult(
                id=record["id"], source=source, sha256=record["sha256"],
                top_k=tuple((item["label"], item["score"]) for item in record["top_k"]),
                model_version=record["model_version"], backbone=record["backbone"], time=record["time"],
                destination=destination,
            )
            self._finish(entry, result)
        return len(entries)
