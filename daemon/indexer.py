"""Keeps the catalog of training files and their bottlenecks in step with `classes/<label>/`."""

from __future__ import annotations

import functools
import logging
import os
import re
import unicodedata
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon.extractor import Extractor, Job
from daemon.images import ImageRejected, folder_link_message, read_image_file
from daemon.metrics import Metrics
from daemon.store import CatalogEntry, Store, file_signature

log = logging.getLogger(__name__)


#: Control characters (C0, DEL, C1) and Unicode's line and paragraph separators: every character at which
#: `str.splitlines()`, the reader of `labels.txt`, breaks a line is among them.
_LINE_OR_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def label_problem(label: str) -> str | None:
    """Why `label` (a folder name under `classes/`) cannot name a class, or None: a control character or a
    line separator (a line break would split it in two in `labels.txt`, one label per line, and shift every
    label after it)."""
    if _LINE_OR_CONTROL.search(label):
        return "has a control character or a line separator"
    return None


def label_of(folder: str) -> str:
    """The class a folder under `classes/` names: its name in Unicode's composed form (NFC, UAX #15). macOS
    writes names decomposed (NFD) and most other systems composed, so one name copied from both would
    otherwise be two labels that look the same; both folders' images train the one label."""
    return unicodedata.normalize("NFC", folder)


def _storable(rel: str) -> bool:
    """A name with bytes that are not UTF-8 (surrogate escapes) cannot be a label or a catalog key."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class _Planned:
    """A training file to read, with what the catalog knew of it."""

    path: Path
    rel: str
    label: str
    st: os.stat_result
    known: CatalogEntry | None
    has_vector: bool


@dataclass
class Indexing:
    """A chunk of training files being read and decoded (`TrainingIndexer.begin`), then its catalog rows and new
    bottlenecks to write (`embed`), written by `commit`."""

    planned: list[_Planned] = field(default_factory=list)
    jobs: list[Future[Job]] = field(default_factory=list)
    writes: list[CatalogEntry] = field(default_factory=list)
    bottlenecks: list[tuple[str, str, np.ndarray]] = field(default_factory=list)
    changed: bool = False  # a file's content is new to the training set
    lost: bool = False  # a file that was usable no longer is


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
        self._outside: dict[Path, tuple[int, int, int, int]] = {}  # warned about (`_warn_once`), as they were

    @property
    def backbone_id(self) -> str:
        return self._extractor.backbone.id

    def relative(self, path: Path) -> str | None:
        """`label/...` for a file below a label folder; None for anything else (e.g. a file in the root)."""
        rel = path.relative_to(self.root)
        return rel.as_posix() if len(rel.parts) >= 2 else None

    def forget(self, path: Path) -> None:
        """A file or folder left `classes/`: drop it and everything below it from the catalog."""
        self._outside.pop(path, None)
        rel = path.relative_to(self.root).as_posix()
        if path != self.root and _storable(rel) and self._store.remove_files(rel):
            self._on_change()

    def index(self, paths: list[Path]) -> None:
        """Bring each file's catalog entry up to date; only content not yet in the store hits the backbone."""
        chunk = self.begin(paths)
        self.embed(chunk)
        self.commit(chunk)

    def begin(self, paths: list[Path]) -> Indexing:
        """Decide which files must be read (new or changed since their catalog entry) and start reading,
        hashing and decoding them on the extractor's pool; `end` finishes. The caching thread begins its next
        chunk before it ends this one."""
        chunk = Indexing()
        for path in paths:
            planned = self._plan(path, chunk)
            if planned is not None:
                chunk.planned.append(planned)
        loads = [(str(p.path), functools.partial(read_image_file, p.path, self._max_bytes)) for p in chunk.planned]
        chunk.jobs = self._extractor.submit(loads)
        return chunk

    def embed(self, chunk: Indexing) -> None:
        """Embed what `begin` started and make the chunk's catalog rows; nothing is written yet (`commit`)."""
        extraction = self._extractor.gather(chunk.jobs, keep=False)
        chunk.bottlenecks = extraction.unstored
        for p in chunk.planned:
            key = str(p.path)
            sha = extraction.hashes.get(key)
            problem = extraction.rejected.get(key)
            entry = CatalogEntry.seen(p.rel, p.label, sha, p.st, problem is None)
            chunk.writes.append(entry)
            if problem is not None:
                chunk.lost |= self._skipped(entry, problem)
            elif not (p.known and p.known.ok and p.known.sha256 == sha and p.has_vector):
                chunk.changed = True  # else touched, not changed: no retrain needed

    def commit(self, chunk: Indexing) -> None:
        """Write an embedded chunk's new bottlenecks and catalog rows in one transaction (any thread: the caching
        thread has it done beside the next chunk's forward pass), then tell the trainer if the set changed."""
        self._extractor.keep(chunk.bottlenecks, chunk.writes)
        if chunk.changed or chunk.lost:
            self._on_change()

    def _plan(self, path: Path, chunk: Indexing) -> _Planned | None:
        """The file to read, or None when there is nothing to do (or only a catalog row, added to `chunk`)."""
        rel = self.relative(path)
        if rel is None:
            self._warn_once(path, folder_link_message(path) if path.is_dir() else
                            f"{path}: not inside a label folder (classes/<label>/...); ignored", counted=False)
            return None
        if not _storable(rel):
            self._warn_once(path, f"{path}: skipped for training: its name is not valid UTF-8; rename it")
            return None
        label = label_of(rel.split("/", 1)[0])
        problem = label_problem(label)
        if problem is not None:
            self._warn_once(path, f"{path}: skipped for training: the label folder name {label!r} {problem}; "
                            "rename the folder")
            return None
        known = self._store.catalog_entry(rel)
        try:
            st = os.stat(path)
        except OSError as exc:
            chunk.writes.append(CatalogEntry(rel, label, None, 0, 0, False))
            chunk.lost |= self._skipped(chunk.writes[-1], ImageRejected("unreadable", str(exc)))
            return None
        has_vector = bool(known and known.ok and known.sha256 and not self._store.missing_bottlenecks(
            self._extractor.backbone.id, [known.sha256]))
        if (known and known.label == label  # a row from before `label_of` is written again
                and known.signature == file_signature(st) and (has_vector or not known.ok)):
            return None
        return _Planned(path, rel, label, st, known, has_vector)

    def _warn_once(self, path: Path, message: str, counted: bool = True) -> None:
        """Warn about a file that gets no catalog row (outside the label folders, a link to a folder there,
        an unusable name), once until it changes: every periodic rescan finds it again. `counted`: also in
        `retraind_rejected_files_total{reason="unsupported"}`."""
        try:
            signature = file_signature(os.lstat(path))
        except OSError:
            return
        if self._outside.get(path) == signature:
            return
        self._outside[path] = signature
        log.warning("%s", message)
        if counted:
            self._metrics.rejected.labels(reason="unsupported").inc()

    def _skipped(self, entry: CatalogEntry, problem: ImageRejected) -> bool:
        """Log and count an unusable file; True if its catalog entry was usable until now."""
        log.warning("%s: skipped for training: %s", self.root / entry.path, problem)
        self._metrics.rejected.labels(reason=problem.reason).inc()
        was = self._store.catalog_entry(entry.path)
        return was is not None and was.ok
