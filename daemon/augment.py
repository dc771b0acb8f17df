"""Cached augmentation. retrain.py distorted every training image at every step, which bypassed the bottleneck
cache and ran the whole network per image per step ("ten minutes for ten images"). Here each training image
gets a fixed number of distorted variants, made once: their bottlenecks are stored beside the original under
the variant key `<recipe>.<index>` and become extra rows of the train split. Validation and test images are
never distorted, so held-out accuracy still measures real images.

The recipe is a short hash of every distortion's name and settings plus `augmentation.seed`: changing a
setting makes new variants and the old ones are pruned. The random draws of variant `i` of an image come from
its content hash and its key, so a variant computed again is the same image.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from daemon.config import AugmentationConfig
from daemon.dataset import Dataset, Part
from daemon.extractor import Extractor
from daemon.images import Decoder, ImageRejected, read_image_file
from daemon.store import CatalogEntry, Store

log = logging.getLogger(__name__)

#: (sha256, image bytes, variant index): one variant to make
Job = tuple[str, bytes, int]


class Distortion(Protocol):
    """A random transform of a decoded training image, contributed via `retraind_register_distortions`."""

    @property
    def name(self) -> str:
        """Short name; with `setting` it goes into the recipe hash."""

    @property
    def setting(self) -> str:
        """The settings as canonical text: a change makes new variants."""

    @property
    def oversample(self) -> float:
        """How many times larger than the backbone input the image should be decoded (1.0: no need)."""

    @property
    def variety(self) -> int:
        """Distinct images it can make from one input, the unchanged one included; 0 for unbounded."""

    def apply(self, image: np.ndarray, size: tuple[int, int], index: int,
              rng: np.random.Generator) -> np.ndarray:
        """Distort a uint8 RGB image of any size for variant number `index`, drawing only from `rng`; return
        uint8 RGB. `size` is the backbone input (width, height); a result of another size is resized to it."""


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 RGB array to (width, height)."""
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def _variant_count(distortions: Sequence[Distortion], wanted: int) -> int:
    """More variants than distinct images would only repeat images (a mirror alone makes one new image)."""
    if not distortions:
        return 0
    if all(d.variety for d in distortions):
        return min(wanted, math.prod(d.variety for d in distortions) - 1)
    return wanted


class Augmenter:
    """Makes variant `index` of an image: decoded `oversample` times larger than the backbone input, passed
    through every distortion in order, and sized to the backbone input."""

    def __init__(self, distortions: Sequence[Distortion], config: AugmentationConfig, decode: Decoder,
                 input_size: tuple[int, int], max_pixels: int, preprocessing: str) -> None:
        self.distortions = tuple(distortions)
        self.variants = _variant_count(self.distortions, config.variants_per_image)
        self._seed = config.seed
        text = "|".join(f"{d.name}={d.setting}" for d in self.distortions) + f"|seed={config.seed}"
        self.recipe = hashlib.sha256(text.encode()).hexdigest()[:12] if self.variants else ""
        self.keys = tuple(f"{self.recipe}.{i}" for i in range(self.variants))
        self._decode, self._size, self._max_pixels = decode, input_size, max_pixels
        self._preprocessing = preprocessing  # the backbone's (`daemon.backbone.preprocessing_of`)
        oversample = max((d.oversample for d in self.distortions), default=1.0)
        self._decode_size = (math.ceil(input_size[0] * oversample), math.ceil(input_size[1] * oversample))

    @property
    def summary(self) -> dict[str, Any] | None:
        """What `metrics.json` records (None when off); a restart with another summary retrains."""
        if not self.variants:
            return None
        return {"recipe": self.recipe, "variants_per_image": self.variants, "seed": self._seed,
                "distortions": {d.name: d.setting for d in self.distortions}}

    def image(self, data: bytes, sha256: str, index: int) -> np.ndarray:
        """The uint8 input-sized image of variant `index`; raises ImageRejected."""
        key = hashlib.sha256(f"{sha256}/{self.keys[index]}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
        image = self._decode(data, self._decode_size, self._max_pixels, self._preprocessing)
        if image is None:
            raise ImageRejected("unsupported", "no decoder plugin could read this content")
        for distortion in self.distortions:
            image = distortion.apply(image, self._size, index, rng)
        return image if image.shape[:2] == (self._size[1], self._size[0]) else resize(image, self._size)


def variant_bottlenecks(augmenter: Augmenter, jobs: Iterable[Job], embed: Callable[[np.ndarray], np.ndarray],
                        batch_size: int) -> Iterator[list[tuple[str, str, np.ndarray]]]:
    """Distort and embed `jobs` in batches; yields each batch as (sha256, variant key, vector) triples."""
    batch: list[tuple[str, str, np.ndarray]] = []
    for sha, data, index in jobs:
        try:
            batch.append((sha, augmenter.keys[index], augmenter.image(data, sha, index)))
        except ImageRejected as exc:
            log.warning("content %s: variant %d not made: %s", sha[:12], index, exc)
        if len(batch) == batch_size:
            yield _embedded(batch, embed)
            batch = []
    if batch:
        yield _embedded(batch, embed)


def _embedded(batch: list[tuple[str, str, np.ndarray]], embed: Callable[[np.ndarray], np.ndarray],
              ) -> list[tuple[str, str, np.ndarray]]:
    vectors = embed(np.stack([image for _, _, image in batch]))
    return [(sha, key, vector) for (sha, key, _), vector in zip(batch, vectors)]


class VariantCache:
    """The trainer's side: before a fit, make the missing variants of the current training images (reading
    them from `classes/`, on the trainer thread, through the extractor's forward lock), prune the variants
    of old recipes and of images no longer trained on, and add the rest as train rows."""

    def __init__(self, augmenter: Augmenter, store: Store, extractor: Extractor, classes: Path,
                 max_bytes: int, batch_size: int) -> None:
        self.augmenter = augmenter
        self._store, self._extractor, self._classes = store, extractor, classes
        self._max_bytes, self._batch_size = max_bytes, batch_size

    def attach(self, dataset: Dataset, entries: Sequence[CatalogEntry],
               stopping: Callable[[], bool]) -> Dataset | None:
        """`dataset` with its variant rows; None when `stopping()` turned true while variants were made."""
        backbone, keys = self._extractor.backbone.id, self.augmenter.keys
        sha_of = {entry.path: str(entry.sha256) for entry in entries}
        train = [sha_of[path] for path in dataset.train.paths]
        self._store.prune_variants(backbone, {(sha, key) for sha in train for key in keys})
        if not keys:
            return dataset
        have = self._store.variant_vectors(backbone, f"{self.augmenter.recipe}.")
        todo: dict[str, tuple[str, list[int]]] = {}
        for path, sha in zip(dataset.train.paths, train):
            missing = [i for i, key in enumerate(keys) if (sha, key) not in have]
            if missing:
                todo.setdefault(sha, (path, missing))
        if todo and not self._compute(todo, have, stopping):
            return None
        rows = [(i, have[sha, key]) for i, sha in enumerate(train) for key in keys if (sha, key) in have]
        index = np.array([i for i, _ in rows], dtype=np.int64)
        x = np.stack([v for _, v in rows]) if rows else np.empty((0, dataset.train.x.shape[1]), np.float32)
        paths = tuple(dataset.train.paths[i] for i in index)
        return dataset.with_variants(Part(x, dataset.train.y[index], paths))

    def _compute(self, todo: dict[str, tuple[str, list[int]]], have: dict[tuple[str, str], np.ndarray],
                 stopping: Callable[[], bool]) -> bool:
        """Make and store the missing variants; False if stopped on the way (what was made is kept)."""
        started, made = time.perf_counter(), 0
        backbone = self._extractor.backbone.id
        jobs = self._jobs(todo)
        for batch in variant_bottlenecks(self.augmenter, jobs, self._extractor.embed, self._batch_size):
            self._store.put_bottlenecks(backbone, batch)
            have.update(((sha, key), vector) for sha, key, vector in batch)
            made += len(batch)
            if stopping():
                return False
        log.info("made %d distorted variants of %d training images in %.1f s", made, len(todo),
                 time.perf_counter() - started)
        return True

    def _jobs(self, todo: dict[str, tuple[str, list[int]]]) -> Iterator[Job]:
        """Each image is read once for all its missing variants. A file that moved or changed since it was
        indexed is skipped: the catalog update that follows triggers another run, which makes them."""
        for sha, (path, indices) in todo.items():
            try:
                f = read_image_file(self._classes / path, self._max_bytes)
            except ImageRejected as exc:
                log.info("%s: no variants this run: %s", path, exc)
                continue
            if f.sha256 != sha:
                log.info("%s changed since it was indexed; its variants wait for the next run", path)
                continue
            yield from ((sha, f.data, index) for index in indices)
