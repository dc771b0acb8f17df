"""The training set as matrices: cached bottlenecks of catalog files, split by content (`daemon/split.py`),
plus the cached distorted variants of the training images (daemon/augment.py) as extra train rows."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from daemon.config import SplitConfig
from daemon.split import SPLITS, TRAIN, split_key, split_of
from daemon.store import CatalogEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One split: bottlenecks `x`, label indices `y`, and the catalog paths they came from."""

    x: np.ndarray
    y: np.ndarray
    paths: tuple[str, ...]


@dataclass(frozen=True)
class LabelConflict:
    """One content (sha256) found under more than one label: training rows that contradict each other."""

    sha256: str
    paths: tuple[str, ...]
    labels: tuple[str, ...]

    def record(self) -> dict[str, object]:
        return {"sha256": self.sha256, "labels": list(self.labels), "paths": list(self.paths)}


@dataclass(frozen=True)
class Dataset:
    labels: tuple[str, ...]
    parts: dict[str, Part]
    manifest_sha256: str
    #: labels with no training image, trained on all their images instead (retrain.py would fail on them)
    borrowed: tuple[str, ...] = field(default=())
    #: distorted variants of train images, `paths` naming their source; fitted on, never evaluated or counted
    variants: Part | None = None
    #: the same bytes under two or more labels, by sha256
    conflicts: tuple[LabelConflict, ...] = field(default=())

    @property
    def train(self) -> Part:
        return self.parts[TRAIN]

    @cached_property
    def training_rows(self) -> Part:
        """What a head is fitted on: the train split followed by the variants of its images."""
        if self.variants is None or not len(self.variants.y):
            return self.train
        train, extra = self.train, self.variants
        x, y = np.concatenate([train.x, extra.x]), np.concatenate([train.y, extra.y])
        return Part(x, y, train.paths + extra.paths)

    def with_variants(self, variants: Part) -> Dataset:
        return dataclasses.replace(self, variants=variants)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per label and split, for metrics and `metrics.json`."""
        out: dict[str, dict[str, int]] = {label: dict.fromkeys(SPLITS, 0) for label in self.labels}
        for split, part in self.parts.items():
            for index in part.y:
                out[self.labels[int(index)]][split] += 1
        return out


def _name(path: str) -> str:
    """The file name of a catalog path (relative, '/'-separated, no trailing '/'): what PurePosixPath's
    `name` gives for it, without building a path object per row (10k rows: 0.13 s)."""
    return path.rpartition("/")[2]


def manifest_of(entries: list[CatalogEntry]) -> str:
    """A hash of (label, content, name) over `entries` in path order: equal manifests, equal training sets."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(f"{entry.label}\0{entry.sha256}\0{_name(entry.path)}\n".encode())
    return digest.hexdigest()


def content_splits(entries: list[CatalogEntry], split: SplitConfig) -> np.ndarray:
    """Each entry's split. Identical bytes share one: a content's key is the least `split_key` of its files
    (all the same, its sha256, unless some are named with `_nohash_`)."""
    key_of: dict[str, str] = {}
    for entry in entries:
        sha = entry.sha256 or entry.path
        key = split_key(_name(entry.path), sha)
        key_of[sha] = min(key_of.get(sha, key), key)
    return np.array([split_of(key_of[entry.sha256 or entry.path], split.validation_percentage,
                              split.testing_percentage) for entry in entries])


def label_conflicts(entries: list[CatalogEntry]) -> tuple[LabelConflict, ...]:
    """Contents that lie under more than one label, by sha256."""
    found: dict[str, list[CatalogEntry]] = {}
    for entry in entries:
        if entry.sha256:
            found.setdefault(entry.sha256, []).append(entry)
    return tuple(LabelConflict(sha, tuple(e.path for e in group), tuple(sorted({e.label for e in group})))
                 for sha, group in sorted(found.items()) if len({e.label for e in group}) > 1)


def _permute_rows(matrix: np.ndarray, order: np.ndarray) -> None:
    """`matrix[i] = old matrix[order[i]]`, in place, one spare row at a time (cycle by cycle)."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        spare, i = matrix[start].copy(), start
        while order[i] != start:
            matrix[i] = matrix[order[i]]
            done[i], i = True, int(order[i])
        matrix[i], done[i] = spare, True


def build_dataset(entries: list[CatalogEntry], matrix: np.ndarray, split: SplitConfig) -> Dataset:
    """Split catalog rows (aligned with `matrix`) into train/validation/test by content.

    `matrix` is reordered in place so that each split is a contiguous block and each part's `x` a view of
    it: a 50k-row training set costs one matrix in memory, not the matrix plus a copy of every split."""
    labels = tuple(sorted({entry.label for entry in entries}))
    index = {label: i for i, label in enumerate(labels)}
    splits = content_splits(entries, split)
    y = np.array([index[e.label] for e in entries], dtype=np.int64)
    train_mask = splits == TRAIN
    borrowed = tuple(label for label in labels if not np.any(train_mask & (y == index[label])))
    for label in borrowed:
        log.warning("label %r has no training image by the name split; training on all its images", label)
        train_mask |= y == index[label]
    rows_of = {name: np.flatnonzero(train_mask if name == TRAIN else (splits == name) & ~train_mask)
               for name in SPLITS}
    _permute_rows(matrix, np.concatenate([rows_of[name] for name in SPLITS]))
    parts: dict[str, Part] = {}
    start = 0
    for name in SPLITS:
        rows = rows_of[name]
        parts[name] = Part(matrix[start : start + len(rows)], y[rows], tuple(entries[i].path for i in rows))
        start += len(rows)
    return Dataset(labels, parts, manifest_of(entries), borrowed, conflicts=label_conflicts(entries))
