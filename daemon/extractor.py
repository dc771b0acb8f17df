"""Bottlenecks for image files: found in the store by content hash, or decoded and run through the backbone in
batches, the next batches decoding image by image on a thread pool while the current one is embedded.

Two kinds of callers share the one engine: urgent ones (inbox files, HTTP requests) and background ones
(caching training images, distorted variants). `EngineTurns` gives the engine to them in turn, batch by batch,
so an inbox file waits for at most one background batch, and a stream of inbox files never starves caching.
Each kind decodes on its own pool, so an inbox file's decoding never queues behind a backlog's.

Decoding is spread image by image over as many threads as there are cores, and kept `_AHEAD` batches ahead of
the forward pass: a phone photo takes longer to decode (DCT-scaled, ~15-30 ms of one core) than to embed
(~6 ms on two cores), so one decoding thread per batch left the engine waiting. The threads compete with the
engine's for the cores, which is the point: no core stays idle while there is work.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from daemon.backbone import Backbone
from daemon.images import ImageFile, ImageRejected
from daemon.metrics import Metrics
from daemon.store import ORIGINAL, Store
from daemon.tflite_engine import default_threads

_AHEAD = 2  # batches decoding while one is embedded
Decoder = Callable[[bytes, tuple[int, int], int], "np.ndarray | None"]


@dataclass
class Extraction:
    """Vectors by sha256, and the files that could not be decoded, by path."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    rejected: dict[str, ImageRejected] = field(default_factory=dict)


class Extractor:
    def __init__(
        self, backbone: Backbone, decode: Decoder, store: Store, metrics: Metrics, max_pixels: int,
        batch_size: int,
    ) -> None:
        self.backbone = backbone
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

    def decode(self, data: bytes) -> np.ndarray:
        """Decode one image to the backbone's input size; raises ImageRejected."""
        image = self._decode(data, self.backbone.input_size, self._max_pixels)
        if image is None:
            raise ImageRejected("unsupported", "no decoder plugin could read this content")
        return image

    def embed(self, images: np.ndarray, urgent: bool = False) -> np.ndarray:
        """Bottlenecks (N, dim) for uint8 images (N, height, width, 3), in the engine's next turn for `urgent`
        (inbox, HTTP) or background (caching, variants) work."""
        with self.turns.turn(urgent), self._metrics.compute_seconds.time():
            return self.backbone.embed(images)

    def extract(self, files: Sequence[ImageFile], urgent: bool = False) -> Extraction:
        """Vectors for `files`, computing (and storing) only content not already in the store."""
        result = Extraction()
        unique = {f.sha256: f for f in files}
        result.vectors.update(self._store.get_bottlenecks(self.backbone.id, unique))
        self._metrics.cache_hits.inc(len(result.vectors))
        todo = [f for sha, f in unique.items() if sha not in result.vectors]
        computed: list[tuple[str, str, np.ndarray]] = []
        for batch, images in self._decoded_batches(todo, result, self._pools[urgent]):
            vectors = self.embed(images, urgent)
            computed += ((f.sha256, ORIGINAL, v) for f, v in zip(batch, vectors))
            result.vectors.update((f.sha256, v) for f, v in zip(batch, vectors))
        self._store.put_bottlenecks(self.backbone.id, computed)  # one commit for the call, not one per batch
        self._metrics.cache_misses.inc(len(computed))
        for f in files:  # files sharing bad content were decoded once: each of them is rejected
            if f.sha256 not in result.vectors and str(f.path) not in result.rejected:
                result.rejected[str(f.path)] = result.rejected[str(unique[f.sha256].path)]
        return result

    def _decoded_batches(
        self, files: list[ImageFile], result: Extraction, pool: ThreadPoolExecutor
    ) -> Iterator[tuple[list[ImageFile], np.ndarray]]:
        """Yield (files, uint8 images) batches; the next `_AHEAD` batches decode, image by image, meanwhile."""
        chunks = [files[i : i + self._batch_size] for i in range(0, len(files), self._batch_size)]
        ahead: deque[list[Future[np.ndarray | ImageRejected]]] = deque()
        for index, chunk in enumerate(chunks):
            while len(ahead) <= _AHEAD and index + len(ahead) < len(chunks):
                ahead.append([pool.submit(self._decode_one, f) for f in chunks[index + len(ahead)]])
            decoded = [future.result() for future in ahead.popleft()]  # popped: used pixels are freed
            good = [(f, image) for f, image in zip(chunk, decoded) if not isinstance(image, ImageRejected)]
            for f, image in zip(chunk, decoded):
                if isinstance(image, ImageRejected):
                    result.rejected[str(f.path)] = image
            if good:
                yield [f for f, _ in good], np.stack([image for _, image in good])

    def _decode_one(self, f: ImageFile) -> np.ndarray | ImageRejected:
        started = time.perf_counter()
        try:
            return self.decode(f.data)
        except ImageRejected as exc:
            return exc
        finally:
            self._metrics.classification_seconds.labels(stage="decode").observe(time.perf_counter() - started)


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
