"""The caching thread: brings the catalog of training files and their bottlenecks up to date in the background,
so that the pipeline thread stays free for inbox files (the engine is shared with it in turns).

The pipeline hands it the training files that are due and the paths that left `classes/`, in event order,
on one queue: a file deleted and created again is forgotten and indexed in that order. It alone calls the
indexer. A chunk's rows and bottlenecks are committed on a thread of their own (`retraind-cache-commit`) while
the next chunk is embedded, one chunk at a time and in order; a forget, the stop and going idle wait for it. A chunk that fails is tried again file by file; files that fail alone are handed back to the
pipeline (`on_retry`), which takes them again later with a growing delay. `stop()` ends it after the chunk
in hand."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.indexer import Indexing, TrainingIndexer
from daemon.logs import short
from daemon.metrics import InternalErrorPlace, Metrics

if TYPE_CHECKING:
    from daemon.pipeline import Progress

log = logging.getLogger(__name__)

STOP = object()
_CHUNK = 128  # files indexed together: one catalog transaction; a chunk of phone photos holds ~170 MB


class Backfill(threading.Thread):
    def __init__(self, indexer: TrainingIndexer, progress: Progress, metrics: Metrics,
                 on_retry: Callable[[list[Path]], None], on_idle: Callable[[], None]) -> None:
        super().__init__(name="retraind-cache", daemon=False)
        self._indexer, self._progress, self._metrics = indexer, progress, metrics
        self._on_retry, self._on_idle = on_retry, on_idle
        self._work: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0  # files handed over and not yet indexed
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retraind-cache-commit")
        self._committing: tuple[list[Path], Future[None]] | None = None  # the chunk being committed
        self._stopping = threading.Event()

    def outstanding(self) -> int:
        """Training files handed over and not yet indexed (any thread)."""
        with self._lock:
            return self._outstanding

    def index(self, paths: list[Path]) -> None:
        with self._lock:
            self._outstanding += len(paths)
        for start in range(0, len(paths), _CHUNK):
            self._work.put(paths[start : start + _CHUNK])

    def forget(self, path: Path) -> None:
        self._work.put(path)

    def stop(self) -> None:
        """End after the chunk in hand: chunks still queued are dropped (their files are not cataloged, so the
        next start's scan takes them); a stop never waits for a backlog of thousands of images."""
        self._stopping.set()
        self._work.put(STOP)

    def run(self) -> None:
        try:
            self._run()
        finally:
            self._commits.shutdown()

    def _run(self) -> None:
        """Chunks in queue order; while a chunk is embedded, the next one already queued is begun (read and
        decoded on the pool) and the one before is committed, so the engine waits at a chunk's edge neither
        for decoding nor for the store. Chunks queued one after another are begun as one (`_merged`)."""
        begun: tuple[list[Path], Indexing | None] | None = None
        held: object = None  # an item taken off the queue while merging, handled next
        while True:
            if self._stopping.is_set():
                item = STOP
            elif held is not None:
                item, held = held, None
            else:
                try:
                    item = self._work.get(block=begun is None)
                except queue.Empty:
                    item = None
            if isinstance(item, list):
                item, held = self._merged(item)
                following = (item, self._begin(item))
                if begun is not None:
                    self._end(*begun)
                begun = following
                continue
            if begun is not None:
                self._end(*begun)
                begun = None
            self._settle()
            if isinstance(item, Path):
                self._forget(item)
            if item is STOP:
                return
            if held is None and self._work.empty():
                self._on_idle()

    def _merged(self, paths: list[Path]) -> tuple[list[Path], object]:
        """`paths` with the chunks queued right behind it, up to `_CHUNK` files, and the first item taken that
        did not fit (None if none). Files copied in one by one reach the caching thread as chunks of 1-4
        (each pipeline turn hands over what closed since the last): begun alone, a chunk of one phone photo
        kept one of the pool's threads busy and had the engine embed one image and commit its row."""
        paths = list(paths)
        while len(paths) < _CHUNK:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return paths, None
            if not isinstance(item, list) or len(paths) + len(item) > _CHUNK:
                return paths, item
            paths += item
        return paths, None

    def _begin(self, paths: list[Path]) -> Indexing | None:
        try:
            return self._indexer.begin(paths)
        except Exception:
            log.exception("starting to cache %d training files failed; tried again file by file", len(paths))
            self._metrics.internal_error("pipeline_step")
            return None

    def _forget(self, path: Path) -> None:
        try:
            self._indexer.forget(path)
        except Exception:
            log.exception("%s: forgetting failed; the next rescan mends it", path)
            self._metrics.internal_error("pipeline_step")

    def _end(self, paths: list[Path], chunk: Indexing | None) -> None:
        """Embed a begun chunk and hand its commit to the commit thread, once the chunk before is committed. The
        engine stood still for each chunk's commit (6-33 ms per 128 small images: 640 KB of vectors written
        and fsynced), on the caching thread between one chunk's forward pass and the next."""
        try:
            if chunk is None:
                raise RuntimeError("its start failed")
            self._indexer.embed(chunk)
        except Exception:
            log.exception("caching %d training files failed; trying again", len(paths))
            self._settle()
            self._retried(paths)
            return
        self._settle()
        self._committing = (paths, self._commits.submit(self._indexer.commit, chunk))

    def _settle(self) -> None:
        """Wait for the chunk being committed (if any) and count it done; one whose commit failed is tried again
        file by file."""
        if self._committing is None:
            return
        paths, commit = self._committing
        self._committing = None
        try:
            commit.result()
        except Exception:
            log.exception("committing %d training files failed; trying again", len(paths))
            self._retried(paths)
            return
        self._done(paths, [])

    def _retried(self, paths: list[Path]) -> None:
        self._metrics.internal_error("pipeline_step")
        self._done(paths, guarded(self._indexed, paths, self._metrics))

    def _done(self, paths: list[Path], retry: list[Path]) -> None:
        with self._lock:
            self._outstanding -= len(paths)
            waiting = self._outstanding
        if retry:
            self._on_retry(retry)
        self._progress.indexed(len(paths), waiting)
        self._progress.went_round()  # a long caching run is progress, not a hang: the watchdog is fed

    def _indexed(self, paths: list[Path]) -> list[Path]:
        self._indexer.index(paths)
        return []


def guarded(work: Callable[[list[Path]], list[Path]], paths: list[Path], metrics: Metrics,
            attempts: Mapping[Path, int] | None = None) -> list[Path]:
    """Run `work` on a batch, then alone on each file of a batch that failed; returns the files to retry:
    those `work` returned and those that failed alone. Failures are counted in `metrics`. A file that fails
    again (`attempts`: its failures in a row so far) logs one short line; the traceback only the first time."""
    try:
        return work(paths)
    except Exception as exc:
        if len(paths) == 1:
            _failed(paths[0], exc, metrics, "pipeline_batch", traceback=not (attempts or {}).get(paths[0], 0))
            return list(paths)
        log.exception("a batch of %d files failed; trying them one by one", len(paths))
        metrics.internal_error("pipeline_batch")
    retry: list[Path] = []
    for path in paths:
        try:
            retry += work([path])
        except Exception as exc:  # noqa: BLE001 - the batch's traceback is logged just before
            _failed(path, exc, metrics, "pipeline_file", traceback=False)
            retry.append(path)
    return retry


def _failed(path: Path, exc: Exception, metrics: Metrics, where: InternalErrorPlace, traceback: bool) -> None:
    log.error("%s: failed (%s); retried later", path, short(exc), exc_info=traceback)
    metrics.internal_error(where)
