"""Bottlenecks for image files: found in the store by content hash, or decoded and run through the backbone in
batches, the next batch decoding on a small thread pool while the current one is embedded.

Measured on 2 cores (EfficientNet-Lite0, TFLite engine, 806 tuxpaint6 images through the daemon): the forward
pass takes 92% of the fill time, everything else in the indexer and here 8% (decoding the first batch of each
call 4%, catalog writes 2%, store writes 1%). Decoding costs about 1 ms of one core per image against about
10 core-ms for the forward pass with 2 engine threads: what it takes from the engine is the limit on 2 cores,
not waiting for it. Decoding inline was no faster (within the noise of a shared machine); the engine on one
thread with decoding on the other core was 20-30% slower."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from daemon.backbone import Backbone
from daemon.images import ImageFile, ImageRejected
from daemon.metrics import Metrics
from daemon.store import ORIGINAL, Store

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
        self._forward_lock = threading.Lock()  # the pipeline and HTTP threads share one backbone
        # Two: the first two batches decode at once while the engine has nothing to do; after that one batch
        # ahead is all the engine can use, and more threads would only take cores from it.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="retraind-decode")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def decode(self, data: bytes) -> np.ndarray:
        """Decode one image to the backbone's input size; raises ImageRejected."""
        image = self._decode(data, self.backbone.input_size, self._max_pixels)
        if image is None:
            raise ImageRejected("unsupported", "no decoder plugin could read this content")
        return image

    def embed(self, images: np.ndarray) -> np.ndarray:
        with self._forward_lock, self._metrics.compute_seconds.time():
            return self.backbone.embed(images)

    def extract(self, files: Sequence[ImageFile]) -> Extraction:
        """Vectors for `files`, computing (and storing) only content not already in the store."""
        result = Extraction()
        unique = {f.sha256: f for f in files}
        result.vectors.update(self._store.get_bottlenecks(self.backbone.id, unique))
        self._metrics.cache_hits.inc(len(result.vectors))
        todo = [f for sha, f in unique.items() if sha not in result.vectors]
        for batch, images in self._decoded_batches(todo, result):
            vectors = self.embed(images)
            self._store.put_bottlenecks(self.backbone.id, ((f.sha256, ORIGINAL, v) for f, v in zip(batch, vectors)))
            result.vectors.update((f.sha256, v) for f, v in zip(batch, vectors))
            self._metrics.cache_misses.inc(len(batch))
        for f in files:  # files sharing bad content were decoded once: each of them is rejected
            if f.sha256 not in result.vectors and str(f.path) not in result.rejected:
                result.rejected[str(f.path)] = result.rejected[str(unique[f.sha256].path)]
        return result

    def _decoded_batches(
        self, files: list[ImageFile], result: Extraction
    ) -> Iterator[tuple[list[ImageFile], np.ndarray]]:
        """Yield (files, uint8 images) batches; decoding of batch k+1 runs while batch k is embedded."""
        chunks = [files[i : i + self._batch_size] for i in range(0, len(files), self._batch_size)]
        ahead = deque(self._pool.submit(self._decode_chunk, chunk) for chunk in chunks[:1])
        for index, chunk in enumerate(chunks):
            if index + 1 < len(chunks):
                ahead.append(self._pool.submit(self._decode_chunk, chunks[index + 1]))
            decoded = ahead.popleft().result()  # popped: a used batch's pixels are freed, not kept to the end
            good = [(f, image) for f, image in zip(chunk, decoded) if not isinstance(image, ImageRejected)]
            for f, image in zip(chunk, decoded):
                if isinstance(image, ImageRejected):
                    result.rejected[str(f.path)] = image
            if good:
                yield [f for f, _ in good], np.stack([image for _, image in good])

    def _decode_chunk(self, chunk: list[ImageFile]) -> list[np.ndarray | ImageRejected]:
        out: list[np.ndarray | ImageRejected] = []
        for f in chunk:
            started = time.perf_counter()
            try:
                out.append(self.decode(f.data))
            except ImageRejected as exc:
                out.append(exc)
            self._metrics.classification_seconds.labels(stage="decode").observe(time.perf_counter() - started)
        return out
