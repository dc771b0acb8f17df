"""Caching training images keeps the engine and the decoding pool busy together (no timings asserted): the
engine starts on a chunk's first decoded images while the pool decodes the rest, and files handed over one at
a time (a copy, file by file) are begun together, not one chunk of one file after another. None is lost."""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from daemon.backfill import Backfill
from daemon.extractor import Extractor, Job
from daemon.images import ImageFile
from daemon.indexer import TrainingIndexer
from daemon.metrics import Metrics
from daemon.pipeline import NoProgress
from daemon.store import Store
from tests.conftest import wait_for


class Engine:
    """An engine that runs one image per pass (as the TFLite engine does), noting the size of each call; while
    `hold` is set, a call waits for `release` (`held` tells one is waiting)."""

    id, input_size, dim = "one-per-pass/v1", (8, 8), 4
    one_image_per_pass = True

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.hold, self.held, self.release = threading.Event(), threading.Event(), threading.Event()

    def embed(self, images: np.ndarray) -> np.ndarray:
        if self.hold.is_set():
            self.held.set()
            self.release.wait(60)
        self.calls.append(len(images))
        return np.ones((len(images), self.dim), dtype=np.float32)


def test_the_engine_starts_on_a_chunk_before_the_pool_has_decoded_all_of_it(tmp_path: Path) -> None:
    """12 training images, the last 8 of which decode only once the test allows: the first 4 are embedded
    meanwhile (before, the engine waited for a batch of 32 or the chunk's end, idle beside the decoding)."""
    engine = Engine()
    allowed = threading.Event()

    def decode(data: bytes, size: tuple[int, int], max_pixels: int, preprocessing: str) -> np.ndarray:
        if data[0] >= 4:
            allowed.wait(60)
        return np.zeros((size[1], size[0], 3), dtype=np.uint8)

    store = Store(tmp_path / "store.sqlite")
    extractor = Extractor(engine, decode, store, Metrics(), 10**8, batch_size=32)
    files = [ImageFile(Path(f"{i}.jpg"), bytes([i]) * 10, f"{i:064x}") for i in range(12)]
    jobs: list[Future[Job]] = extractor.submit([(str(f.path), functools.partial(lambda f: f, f)) for f in files])
    gathered: list[int] = []
    worker = threading.Thread(target=lambda: gathered.append(len(extractor.gather(jobs).vectors)))
    worker.start()
    try:
        wait_for(lambda: sum(engine.calls) >= 4, timeout=10,
                 what="the first decoded images embedded while the rest of the chunk still decodes")
    finally:
        allowed.set()
        worker.join()
        extractor.close()
    assert gathered == [12] and sum(engine.calls) == 12
    assert len(store.get_bottlenecks(engine.id, [f.sha256 for f in files])) == 12
    store.close()


def test_files_handed_over_one_at_a_time_are_begun_together(tmp_path: Path) -> None:
    """While the engine holds the caching thread's first file, 12 more are handed over one per chunk (as a
    copy delivers them): they are begun as one chunk, so the engine gets them several at a time (before: 12
    chunks of one file, one image per engine call and one commit each), and every file is catalogued."""
    classes = tmp_path / "classes"
    paths = []
    for i in range(13):
        path = classes / "red" / f"red-{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"image {i}".encode())
        paths.append(path)
    engine = Engine()
    store = Store(tmp_path / "store.sqlite")
    metrics = Metrics()
    extractor = Extractor(engine, lambda data, size, max_pixels, preprocessing: np.zeros((8, 8, 3), dtype=np.uint8), store,
                          metrics, 10**8, batch_size=32)
    indexer = TrainingIndexer(classes, store, extractor, metrics, 10**6, on_change=lambda: None)
    backfill = Backfill(indexer, NoProgress(), metrics, on_retry=lambda paths: None, on_idle=lambda: None)
    backfill.start()
    try:
        engine.hold.set()
        backfill.index(paths[:1])
        wait_for(engine.held.is_set, what="the first file in the engine")
        for path in paths[1:]:
            backfill.index([path])
        time.sleep(0.05)  # the chunks are queued behind the held one
        engine.hold.clear()
        engine.release.set()
        wait_for(lambda: backfill.outstanding() == 0, what="every file cached")
    finally:
        backfill.stop()
        backfill.join()
        extractor.close()
    assert engine.calls[0] == 1 and sum(engine.calls) == 13
    assert max(engine.calls[1:]) > 1, f"the 12 files went through the engine as {engine.calls[1:]}"
    catalog = store.catalog()
    assert sorted(catalog) == sorted(f"red/red-{i}.jpg" for i in range(13))
    assert all(entry.ok for entry in catalog.values())
    store.close()


def test_the_next_chunk_is_embedded_while_a_chunk_is_committed(tmp_path: Path) -> None:
    """132 training files make two chunks (128 + 4). While another writer holds the store's write lock, the
    first chunk's commit waits for it; the second chunk is embedded meanwhile (before, the caching thread
    committed each chunk itself, between one chunk's forward pass and the next, and the engine stood still).
    Once the lock is let go both chunks are catalogued, in one commit each."""
    classes = tmp_path / "classes"
    (classes / "red").mkdir(parents=True)
    paths = []
    for i in range(132):
        paths.append(classes / "red" / f"red-{i}.jpg")
        paths[-1].write_bytes(f"image {i}".encode())
    engine = Engine()
    store = Store(tmp_path / "store.sqlite")
    metrics = Metrics()
    extractor = Extractor(engine, lambda data, size, max_pixels, preprocessing: np.zeros((8, 8, 3), dtype=np.uint8),
                          store, metrics, 10**8, batch_size=32)
    indexer = TrainingIndexer(classes, store, extractor, metrics, 10**6, on_change=lambda: None)
    backfill = Backfill(indexer, NoProgress(), metrics, on_retry=lambda paths: None, on_idle=lambda: None)
    other = sqlite3.connect(tmp_path / "store.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer (a backup, `retraind import`) holds the write lock
    backfill.start()
    try:
        backfill.index(paths)
        wait_for(lambda: sum(engine.calls) == 132, timeout=15,
                 what="the second chunk embedded while the first one's commit waits for the store")
        assert store.catalog() == {} and backfill.outstanding() == 132
    finally:
        other.execute("ROLLBACK")
        other.close()
        wait_for(lambda: backfill.outstanding() == 0, what="both chunks committed")
        backfill.stop()
        backfill.join()
        extractor.close()
    catalog = store.catalog()
    assert sorted(catalog) == sorted(f"red/red-{i}.jpg" for i in range(132))
    assert len(store.get_bottlenecks(engine.id, [entry.sha256 or "" for entry in catalog.values()])) == 132
    assert metrics.registry.get_sample_value("retraind_bottleneck_cache_misses_total") == 132
    store.close()
