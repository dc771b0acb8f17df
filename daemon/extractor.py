"""Bottlenecks for image files: found in the store by content hash, or decoded and run through the backbone in
batches, the next batches decoding image by image on a thread pool while the current one is embedded.

Two kinds of callers share the one engine: urgent ones (inbox files, HTTP requests) and background ones
(caching training images, distorted variants). `EngineTurns` gives the engine to them in turn, batch by batch,
so an inbox file waits for at most one background batch, and a stream of inbox files never starves caching.
On an engine that runs one image per pass (TFLite) a background batch takes its turns `BACKGROUND_PIECE`
images at a time, at no cost to its speed: an inbox file waits for 4 images, not 32 (0.3-1 s on 2 busy cores,
the largest part of an inbox file's latency during a backfill).
Each kind decodes on its own pool, so an inbox file's decoding never queues behind a backlog's.

Reading, hashing, the store lookup and decoding run image by image on as many threads as there are cores, all
of a chunk submitted at once (`submit`), while the caller embeds what is decoded (`gather`); the caching thread
submits its next chunk before collecting the current one, so the engine never waits at a chunk's edge. A phone
photo takes longer to decode (DCT-scaled, ~15-30 ms of one core) than to embed (~6 ms on two cores): one
decoding thread per batch left the engine waiting. The threads compete with the engine's for the cores, which
is the point: no core stays idle while there is work.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from daemon.backbone import Backbone, preprocessing_of, served_as
from daemon.engines import default_threads, gains_from_batches
from daemon.images import Decoder, ImageFile, ImageRejected, decode_or_reject
from daemon.metrics import Metrics
from daemon.store import ORIGINAL, CatalogEntry, Store

#: Images a background turn embeds at most on an engine that does not gain from batches
BACKGROUND_PIECE = 4


@dataclass
class Extraction:
    """Vectors by sha256, the files that could not be read or decoded by path, and each file's sha256;
    `unstored`: the (sha256, variant, vector) computed and left for the caller to store (`gather(keep=False)`)."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    rejected: dict[str, ImageRejected] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    unstored: list[tuple[str, str, np.ndarray]] = field(default_factory=list)


@dataclass
class Job:
    """One file on its way to a bottleneck: found in the store (`vector`), decoded and waiting for the engine
    (`image`), or unusable (`problem`)."""

    key: str
    sha256: str = ""
    vector: np.ndarray | None = None
    image: np.ndarray | None = None
    problem: ImageRejected | None = None


class Extractor:
    """`preprocessings`: the versions the decoder makes besides the backbone's own (`runs`)."""

    def __init__(
        self, backbone: Backbone, decode: Decoder, store: Store, metrics: Metrics, max_pixels: int,
        batch_size: int, preprocessings: Collection[str] = frozenset(),
    ) -> None:
        self.backbone = backbone
        self._preprocessings = frozenset(preprocessings)
        #: the images a background turn embeds at most
        self._piece = batch_size if gains_from_batches(backbone) else BACKGROUND_PIECE
        self._decode = decode
        self._store = store
        self._metrics = metrics
        self._max_pixels = max_pixels
        self._batch_size = batch_size
        self.turns = EngineTurns()
        threads = max(2, default_threads())
        self._pools = {urgent: ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"retraind-decode-{kind}")
                       for urgent, kind in ((True, "inbox"), (False, "cache"))}

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)

    def runs(self, backbone_id: str) -> bool:
        """Whether this extractor can make bottlenecks for a model trained on `backbone_id`: its backbone's own
        id, or the same network with a preprocessing version the decoder makes (`running_as`)."""
        return served_as(self.backbone, backbone_id, self._preprocessings) is not None

    def running_as(self, backbone_id: str) -> Extractor:
        """This extractor for a model trained on `backbone_id` (`runs` must say yes): the same engine, engine
        turns and decoding pools, with images decoded by that id's preprocessing and bottlenecks looked up and
        stored under that id. `self` for the backbone's own id."""
        served = served_as(self.backbone, backbone_id, self._preprocessings)
        if served is None:
            raise ValueError(f"{backbone_id} cannot be run here: the configured backbone is {self.backbone.id}")
        if served is self.backbone:
            return self
        view = copy.copy(self)  # shares the pools, the turns and the store; `close` is the original's
        view.backbone = served
        return view

    def decode(self, data: bytes) -> np.ndarray:
        """Decode one image to the backbone's input size with its id's preprocessing; raises ImageRejected."""
        return decode_or_reject(self._decode, data, self.backbone.input_size, self._max_pixels,
                                preprocessing_of(self.backbone.id))

    def embed(self, images: np.ndarray, urgent: bool = False) -> np.ndarray:
        """Bottlenecks (N, dim) for uint8 images (N, height, width, 3), in the engine's next turn for `urgent`
        (inbox, HTTP) or background (caching, variants) work; background work in turns of at most `piece`
        images."""
        if urgent or len(images) <= self._piece:
            return self._embed_turn(images, urgent)
        return np.concatenate([self._embed_turn(images[start : start + self._piece], urgent)
                               for start in range(0, len(images), self._piece)])

    def _embed_turn(self, images: np.ndarray, urgent: bool) -> np.ndarray:
        with self.turns.turn(urgent), self._metrics.compute_seconds.time():
            return self.backbone.embed(images)

    def embed_parts(self, parts: Sequence[np.ndarray], done: Callable[[int, np.ndarray], None],
                    urgent: bool = False) -> None:
        """Bottlenecks for each of `parts` (uint8 images (N_i, height, width, 3)), one after another in one engine
        turn; `done(i, vectors)` is called as part i is finished, so whoever waits for it does not wait for the
        parts after it (the HTTP batcher answers each request as soon as its images are through)."""
        with self.turns.turn(urgent), self._metrics.compute_seconds.time():
            for index, part in enumerate(parts):
                done(index, self.backbone.embed(part))

    def extract(self, files: Sequence[ImageFile], urgent: bool = False) -> Extraction:
        """Vectors for `files` (already read), computing (and storing) only content not already in the store."""
        return self.gather(self.submit([(str(f.path), functools.partial(_given, f)) for f in files], urgent),
                            urgent)

    def submit(self, loads: Sequence[tuple[str, Callable[[], ImageFile]]], urgent: bool = False) -> list[Future[Job]]:
        """Start each (key, load) on the decoding pool, in order: read (load raises ImageRejected), hash, look
        up the store, decode what is not there. Returns at once; `gather` finishes them. Jobs submitted
        before others decode first, so a caller can submit its next chunk before collecting this one."""
        pool = self._pools[urgent]
        return [pool.submit(self._job, key, load) for key, load in loads]

    def gather(self, jobs: Sequence[Future[Job]], urgent: bool = False, keep: bool = True) -> Extraction:
        """Wait for `jobs` in order and embed their decoded images a batch at a time (background work: a
        piece at a time, as soon as a piece is decoded), while the pool goes on decoding the rest; the new
        bottlenecks are stored in one commit, or, unless `keep`, left in `unstored` for the caller to store
        (and count) with its own writes (the inbox: in its journal's commit, off the engine's thread, which stood still for
        the 3.5-4 ms of each batch's commit). A background piece on an engine that runs one image per pass
        costs what a batch does, and embedding it at once keeps the engine busy beside the decoding: a
        chunk of phone photos had the engine wait for 32 decodes, then embed 32 with the pool idle."""
        result = Extraction()
        size = self._batch_size if urgent else self._piece
        batch: list[Job] = []
        computed: list[tuple[str, str, np.ndarray]] = []
        for future in jobs:
            job = future.result()
            if job.problem is not None:
                result.rejected[job.key] = job.problem
                continue
            result.hashes[job.key] = job.sha256
            if job.vector is not None:
                result.vectors[job.sha256] = job.vector
                self._metrics.cache_hits.inc()
            elif job.sha256 not in result.vectors and all(j.sha256 != job.sha256 for j in batch):
                batch.append(job)  # a second file with the same content shares the first one's vector
            if len(batch) == size:
                computed += self._embed_batch(batch, result, urgent)
        if batch:
            computed += self._embed_batch(batch, result, urgent)
        if keep:
            self.keep(computed)
        else:
            result.unstored = computed
        return result

    def keep(self, unstored: Sequence[tuple[str, str, np.ndarray]], files: Sequence[CatalogEntry] = ()) -> None:
        """Store what a `gather(keep=False)` left in `unstored`, with the catalog entries `files` whose
        bottlenecks they are, in one commit (any thread); `retraind_bottleneck_cache_misses_total` counts
        them once stored (a caller that stores them otherwise counts them with `stored`)."""
        self._store.put_bottlenecks(self.backbone.id, unstored, files)
        self.stored(len(unstored))

    def stored(self, computed: int) -> None:
        """Count `computed` new bottlenecks, stored by the caller (the inbox: with its journal entries)."""
        self._metrics.cache_misses.inc(computed)

    def _embed_batch(self, batch: list[Job], result: Extraction, urgent: bool) -> list[tuple[str, str, np.ndarray]]:
        vectors = self.embed(np.stack([job.image for job in batch if job.image is not None]), urgent)
        result.vectors.update((job.sha256, v) for job, v in zip(batch, vectors))
        done = [(job.sha256, ORIGINAL, v) for job, v in zip(batch, vectors)]
        batch.clear()  # the decoded pixels are freed with the jobs
        return done

    def _job(self, key: str, load: Callable[[], ImageFile]) -> Job:
        try:
            f = load()
        except ImageRejected as exc:
            return Job(key, problem=exc)
        found = self._store.get_bottlenecks(self.backbone.id, [f.sha256])
        if found:
            return Job(key, f.sha256, vector=found[f.sha256])
        started = time.perf_counter()
        try:
            return Job(key, f.sha256, image=self.decode(f.data))
        except ImageRejected as exc:
            return Job(key, f.sha256, problem=exc)
        finally:
            self._metrics.classification_seconds.labels(stage="decode").observe(time.perf_counter() - started)


def _given(f: ImageFile) -> ImageFile:
    return f


class EngineTurns:
    """The engine for urgent and background callers in turn: when both wait, the kind that did not have the
    last turn goes next; when one waits, it goes at once. Several threads of one kind queue among themselves."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._waiting = {True: 0, False: 0}
        self._last: bool | None = None

    @contextmanager
    def turn(self, urgent: bool) -> Iterator[None]:
        with self._cond:
            self._waiting[urgent] += 1
            self._cond.wait_for(lambda: not self._busy and (self._last is not urgent or not self._waiting[not urgent]))
            self._waiting[urgent] -= 1
            self._busy, self._last = True, urgent
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
