"""Keeps the catalog of training files and their bottlenecks in step with `classes/<label>/`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from daemon.extractor import Extractor
from daemon.images import ImageFile, ImageRejected, read_image_file
from daemon.metrics import Metrics
from daemon.store import CatalogEntry, Store, file_signature

log = logging.getLogger(__name__)


def _storable(rel: str) -> bool:
    """A name with bytes that are not UTF-8 (surrogate escapes) cannot be a label or a catalog key."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class TrainingIndexer:
    def __init__(
        self, root: Path, store: Store, extractor: Extractor, metrics: Metrics, max_bytes: int,
        on_change: Callable[[], None],
    ) -> None:
        self.root = root
        self._store = store
        self._extractor = extractor
        self._metrics = metrics
        self._max_bytes = max_bytes
        self._on_change = on_change

    @property
    def backbone_id(self) -> str:
        return self._extractor.backbone.id

    def relative(self, path: Path) -> str | None:
        """`label/...` for a file below a label folder; None for anything else (e.g. a file in the root)."""
        rel = path.relative_to(self.root)
        return rel.as_posix() if len(rel.parts) >= 2 else None

    def forget(self, path: Path) -> None:
        """A file or folder left `classes/`: drop it and everything below it from the catalog."""
        rel = path.relative_to(self.root).as_posix()
        if path != self.root and _storable(rel) and self._store.remove_files(rel):
            self._on_change()

    def index(self, paths: list[Path]) -> None:
        """Bring each file's catalog entry up to date; only content not yet in the store hits the backbone."""
        fresh: list[tuple[CatalogEntry, ImageFile]] = []
        for path in paths:
            read = self._read(path)
            if read is not None:
                fresh.append(read)
        if not fresh:
            return
        extraction = self._extractor.extract([f for _, f in fresh])
        for entry, f in fresh:
            problem = extraction.rejected.get(str(f.path))
            if problem is not None:
                self._skip(path=f.path, entry=entry, problem=problem)
            else:
                self._store.upsert_file(entry)
        self._on_change()

    def _read(self, path: Path) -> tuple[CatalogEntry, ImageFile] | None:
        rel = self.relative(path)
        if rel is None:
            log.warning("%s: not inside a label folder (classes/<label>/...); ignored", path)
            return None
        if not _storable(rel):
            log.warning("%s: skipped for training: its name is not valid UTF-8; rename it", path)
            self._metrics.rejected.labels(reason="unsupported").inc()
            return None
        label = rel.split("/", 1)[0]
        known = self._store.catalog_entry(rel)
        try:
            st = os.stat(path)
        except OSError as exc:
            self._skip(path, CatalogEntry(rel, label, None, 0, 0, False), ImageRejected("unreadable", str(exc)))
            return None
        has_vector = bool(known and known.ok and known.sha256 and not self._store.missing_bottlenecks(
            self._extractor.backbone.id, [known.sha256]))
        if known and known.signature == file_signature(st) and (has_vector or not known.ok):
            return None
        try:
            f = read_image_file(path, self._max_bytes)
        except ImageRejected as exc:
            self._skip(path, CatalogEntry.seen(rel, label, None, st, False), exc)
            return None
        entry = CatalogEntry.seen(rel, label, f.sha256, st, True)
        if known and known.ok and known.sha256 == f.sha256 and has_vector:
            self._store.upsert_file(entry)  # touched, not changed: no retrain needed
            return None
        return entry, f

    def _skip(self, path: Path, entry: CatalogEntry, problem: ImageRejected) -> None:
        log.warning("%s: skipped for training: %s", path, problem)
        self._metrics.rejected.labels(reason=problem.reason).inc()
        was = self._store.catalog_entry(entry.path)
        self._store.upsert_file(entry.unusable())
        if was is not None and was.ok:
            self._on_change()
