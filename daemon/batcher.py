"""Dynamic batching for inference requests: images from concurrent requests are gathered into engine batches,
as TF Serving's `BasicBatchScheduler` does, with its knobs (`http.batching`):

- `max_batch_size`: the most images one batch (one engine turn) takes; a request with more is split across
  batches;
- `batch_timeout_micros`: how long the first image of a batch waits for others before the batch runs (0: run
  with whatever is queued; images that arrive while the engine is busy gather by themselves);
- `max_enqueued_batches`: the queue holds at most this many full batches of images; a request that would go
  beyond is refused at once with `QueueFull` (the HTTP layer answers 503 with `Retry-After`).

One named thread runs each batch in one engine turn through `embed_parts` (the extractor's, as urgent work:
the engine's turns put it level with inbox files and ahead of caching, batch by batch, so no side starves;
tests/test_batcher.py classifies inbox files under HTTP load). For an engine that gains from batches the batch
is one forward pass. For one that does not (the TFLite engine invokes once per image), the batch's requests
run in groups of about `ANSWER_GROUP_IMAGES` images within the batch's turn, each group answered as soon as it
is through, as TF Serving's `StreamingBatchScheduler` lets a batch's tasks finish on their own: the first
request of a batch of 32 waits for 7 others, not 31 (with 64 clients, a 32-image batch is ~190 ms). Not one
group per request: each answered group costs the event loop a wake-up and the engine thread a hand-over of
the GIL, measured at +1-1.5 ms of CPU per request (7-10 % fewer requests/s with 16 clients) when every
request was its own group. Futures are `concurrent.futures.Future`, so an asyncio caller awaits them with
`asyncio.wrap_future`."""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from daemon.config import BatchingConfig
from daemon.metrics import Metrics

log = logging.getLogger(__name__)


#: Images per answered group of a batch, for an engine that gains nothing from batches (see above)
ANSWER_GROUP_IMAGES = 8


class QueueFull(Exception):
    """The batch queue is full; `retry_after` is a hint in whole seconds."""

    def __init__(self, queued: int, retry_after: int) -> None:
        super().__init__(f"the batch queue is full ({queued} images waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class BatcherStopped(Exception):
    """The daemon is stopping; the request was not run."""


@dataclass
class _Task:
    images: np.ndarray
    future: Future[np.ndarray]


_STOP = None


#: Runs the parts (uint8 images [N_i, H, W, 3]) in one engine turn, calling done(i, float32 [N_i, dim]) after each
EmbedParts = Callable[[Sequence[np.ndarray], Callable[[int, np.ndarray], None]], None]


class Batcher:
    def __init__(self, embed_parts: EmbedParts, config: BatchingConfig, metrics: Metrics,
                 gains_from_batches: bool = True) -> None:
        self._embed_parts = embed_parts
        self._group_images = config.max_batch_size if gains_from_batches else ANSWER_GROUP_IMAGES
        self._config = config
        self._metrics = metrics
        self._queue: queue.Queue[_Task | None] = queue.Queue()
        self._queued = 0  # images waiting, under _lock
        self._stopped = False
        self._lock = threading.Lock()
        self._carry: _Task | None = None  # a task that did not fit the last batch: it opens the next
        self._seconds_per_image = 0.01  # smoothed, for Retry-After
        self._thread = threading.Thread(target=self._run, name="retraind-batcher", daemon=False)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Run what is queued (the HTTP server has stopped taking requests by then), join the thread; a
        request submitted after that is refused with BatcherStopped."""
        with self._lock:
            self._stopped = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def submit(self, images: np.ndarray) -> list[Future[np.ndarray]]:
        """Queue uint8 images [N, H, W, 3]; one future per batch-sized part, each giving float32 bottlenecks.
        Raises QueueFull (nothing queued) when the queue cannot take them all."""
        size = self._config.max_batch_size
        limit = size * self._config.max_enqueued_batches
        with self._lock:
            if self._stopped:
                raise BatcherStopped("the daemon is stopping")
            if self._queued + len(images) > limit and self._queued:
                seconds = max(1, round(self._queued * self._seconds_per_image + 0.5))
                raise QueueFull(self._queued, seconds)
            self._queued += len(images)
            self._metrics.batch_queue.set(self._queued)
        tasks = [_Task(images[i : i + size], Future()) for i in range(0, len(images), size)]
        for task in tasks:
            self._queue.put(task)
        return [task.future for task in tasks]

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                break
            self._execute(batch)
        self._refuse_rest()

    def _gather(self) -> list[_Task] | None:
        """Block for a first task, then take more until the batch is full or the timeout passes."""
        first = self._carry or self._queue.get()
        self._carry = None
        if first is _STOP:
            return None
        batch, count = [first], len(first.images)
        deadline = time.monotonic() + self._config.batch_timeout_micros / 1e6
        while count < self._config.max_batch_size:
            try:
                remaining = deadline - time.monotonic()
                task = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if task is _STOP:
                self._queue.put(_STOP)
                break
            if count + len(task.images) > self._config.max_batch_size:
                self._carry = task
                break
            batch.append(task)
            count += len(task.images)
        return batch

    def _execute(self, batch: list[_Task]) -> None:
        count = sum(len(t.images) for t in batch)
        with self._lock:
            self._queued -= count
            self._metrics.batch_queue.set(self._queued)
        self._metrics.batch_size.observe(count)
        # a request whose caller gave up (its awaiting task was cancelled) is not run; the others can no longer be
        # cancelled, so handing them their result cannot fail
        batch = [t for t in batch if t.future.set_running_or_notify_cancel()]
        if not batch:
            return
        groups = self._groups(batch)
        started = time.perf_counter()
        try:
            self._embed_parts([np.concatenate([t.images for t in group]) for group in groups],
                              functools.partial(self._finish, groups))
        except Exception as exc:
            log.exception("an inference batch of %d images failed", count)
            self._metrics.internal_error("inference_batch")
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(exc)
            return
        ran = sum(len(t.images) for t in batch)
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * (time.perf_counter() - started) / ran

    def _groups(self, batch: list[_Task]) -> list[list[_Task]]:
        """Consecutive requests of up to `_group_images` images together (a bigger request alone)."""
        groups: list[list[_Task]] = []
        size = 0
        for task in batch:
            if groups and size + len(task.images) <= self._group_images:
                groups[-1].append(task)
                size += len(task.images)
            else:
                groups.append([task])
                size = len(task.images)
        return groups

    def _finish(self, groups: list[list[_Task]], index: int, vectors: np.ndarray) -> None:
        """Hand out the bottlenecks of group `index` to its requests."""
        start = 0
        for task in groups[index]:
            task.future.set_result(vectors[start : start + len(task.images)])
            start += len(task.images)

    def _refuse_rest(self) -> None:
        pending = [self._carry] if self._carry else []
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not _STOP:
                pending.append(task)
        for task in pending:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(BatcherStopped("the daemon is stopping"))
