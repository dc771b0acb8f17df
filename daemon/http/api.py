"""What the routes need from the daemon: models by version number or label, and the inference path
(decode on a thread pool, in parallel → the dynamic batcher → the version's head)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from http import HTTPStatus

import numpy as np

from daemon import trust
from daemon.batcher import Batcher, BatcherStopped, QueueFull
from daemon.config import Config
from daemon.extractor import Extractor
from daemon.http import MODEL_NAME
from daemon.http.errors import ApiError
from daemon.images import ImageRejected
from daemon.metrics import Metrics
from daemon.registry import ModelRegistry, ModelVersion
from daemon.review import Review
from daemon.serving import ServingModel

log = logging.getLogger(__name__)

#: The most images one request may carry (each is decoded to the backbone's input size in memory).
MAX_INSTANCES = 128
#: TF Serving's version labels: `stable` is the serving version, `candidate` the last one the gate rejected.
LABELS = ("stable", "candidate")
_DECODERS = 2


class Api:
    def __init__(
        self, config: Config, metrics: Metrics, serving: ServingModel, registry: ModelRegistry,
        extractor: Extractor, batcher: Batcher, retrain: Callable[[], ModelVersion | None],
        health: Callable[[], dict[str, object]],
        candidate: Callable[[], ModelVersion | None], review: Review,
        with_trust: Callable[[ModelVersion], ModelVersion] = lambda version: version,
    ) -> None:
        self.config, self.metrics, self.serving, self.registry = config, metrics, serving, registry
        self.extractor, self.batcher, self.retrain, self.health = extractor, batcher, retrain, health
        self.candidate, self.with_trust, self.review = candidate, with_trust, review  # a kept version loaded with its calibrator
        # decoding (and parsing big JSON bodies) off the event loop; Pillow releases the GIL while decoding
        self.pool = ThreadPoolExecutor(max_workers=_DECODERS, thread_name_prefix="retraind-http-decode")
        self._loaded: dict[int, ModelVersion] = {}
        self._waker: _Waker | None = None

    def start(self) -> None:
        """Start the decoding threads now (a pool starts them lazily): the daemon's threads all exist from
        start-up, and a first burst of requests pays no thread creation."""
        barrier = threading.Barrier(_DECODERS)
        for future in [self.pool.submit(barrier.wait) for _ in range(_DECODERS)]:
            future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def ready(self) -> bool:
        """A model is loaded (the engine was warmed up before the server started)."""
        return self.serving.version is not None

    def check_model(self, name: str) -> None:
        if name != MODEL_NAME:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no model named {name!r}; it is {MODEL_NAME!r}")

    def serving_version(self) -> ModelVersion:
        version = self.serving.version
        if version is None:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "no model trained yet")
        return version

    def versions(self) -> list[int]:
        """Kept versions this daemon can serve: trained on the running backbone, or on its network under another
        preprocessing version the decoder makes (`Extractor.runs`)."""
        numbers = []
        for number in self.registry.versions():
            try:
                self.version(number)
            except ApiError:
                continue
            numbers.append(number)
        return numbers

    def version(self, number: int | None = None, label: str | None = None) -> ModelVersion:
        """The serving version, a kept version by number, or one by label; ApiError 404/503 otherwise."""
        if label is not None:
            return self._labelled(label)
        serving = self.serving_version()
        if number is None or number == serving.number:
            return serving
        kept = self.registry.versions()
        if number not in kept:
            self._loaded.pop(number, None)  # pruned since it was loaded
            raise ApiError(HTTPStatus.NOT_FOUND,
                           f"version {number} is not kept (kept: {', '.join(map(str, kept)) or 'none'})")
        if number not in self._loaded:
            try:
                self._loaded[number] = self.with_trust(self.registry.load(number))
            except (OSError, ValueError, KeyError) as exc:
                raise ApiError(HTTPStatus.NOT_FOUND, f"version {number} cannot be loaded: {exc}") from exc
        version = self._loaded[number]
        if not self.extractor.runs(version.backbone):
            raise ApiError(HTTPStatus.NOT_FOUND, f"version {number} was trained on backbone {version.backbone}; "
                                                 f"this daemon runs {self.extractor.backbone.id}")
        return version

    def _labelled(self, label: str) -> ModelVersion:
        if label == "stable":
            return self.serving_version()
        if label == "candidate":
            candidate = self.candidate()
            if candidate is None:
                raise ApiError(HTTPStatus.NOT_FOUND, "no candidate: the gate has rejected no version since start")
            return candidate
        raise ApiError(HTTPStatus.NOT_FOUND, f"no version labelled {label!r}; labels are {', '.join(LABELS)}")

    async def bottlenecks(self, payloads: Sequence[bytes], version: ModelVersion) -> np.ndarray:
        """Decode `payloads` in parallel off the loop as `version` was trained (its backbone id's preprocessing),
        then run them through the batcher: float32 [N, dim]."""
        if not 0 < len(payloads) <= MAX_INSTANCES:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"send 1 to {MAX_INSTANCES} images, not {len(payloads)}")
        loop = asyncio.get_running_loop()
        if self._waker is None or self._waker.loop is not loop:
            self._waker = _Waker(loop)
        inference = _Inference(self, payloads, self._waker, self.extractor.running_as(version.backbone))
        for index in range(len(payloads)):
            self.pool.submit(inference.decode, index)
        try:
            return await inference.answer
        except asyncio.CancelledError:
            inference.cancel()
            raise
        except QueueFull as exc:
            self.metrics.batch_rejections.inc()
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), {"Retry-After": str(exc.retry_after)}) from exc
        except BatcherStopped as exc:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), {"Retry-After": "5"}) from exc

    async def probabilities(self, payloads: Sequence[bytes], version: ModelVersion) -> np.ndarray:
        """Calibrated probabilities [N, labels] in `version.labels` order."""
        return trust.probabilities(version, await self.bottlenecks(payloads, version))


def _decoded(extractor: Extractor, index: int, data: bytes, count: int) -> np.ndarray:
    """Image `index` of `count` in a request, decoded by `extractor` (the version's: `Extractor.running_as`):
    uint8 [H, W, 3]; ApiError 422 if it is not an image."""
    try:
        return extractor.decode(data)
    except ImageRejected as exc:
        where = f"instance {index}: " if count > 1 else ""
        raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY,
                       f"{where}not a usable image ({exc.reason}): {exc}") from exc


class _Waker:
    """Runs callbacks from other threads on the event loop, with one wake-up for all that come before the loop
    gets to them: the requests of an answered group (up to `batcher.ANSWER_GROUP_IMAGES`) cost the loop one
    wake-up, not one each (each wake-up is a write to the loop's self-pipe, an epoll round and a GIL hand-over)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []

    def call(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(callback)
            if len(self._pending) > 1:
                return  # a wake-up is already on its way
        if not self.loop.is_closed():  # closed: the server has stopped, nobody waits
            self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for callback in pending:
            callback()


class _Inference:
    """One request's images on their way to bottlenecks, handed from thread to thread without the event loop:
    each image is decoded on the pool (in parallel), the decoder that finishes last queues them all in the
    batcher, and the batcher's answer (or the first error) comes back to the loop through the `_Waker`. The
    loop is woken once per request, not once per decoded image and once more per answer."""

    def __init__(self, api: Api, payloads: Sequence[bytes], waker: _Waker, extractor: Extractor) -> None:
        self._api, self._payloads, self._waker, self._extractor = api, payloads, waker, extractor
        self.answer: asyncio.Future[np.ndarray] = waker.loop.create_future()
        self._images: list[np.ndarray | None] = [None] * len(payloads)
        self._left = len(payloads)  # images still decoding, under _lock
        self._lock = threading.Lock()
        self._parts: list[Future[np.ndarray]] = []
        self._unanswered = 0  # parts not yet through the batcher, under _lock
        self._ended = False  # answered, failed or cancelled: nothing more to do, under _lock

    def decode(self, index: int) -> None:
        """On a decoding thread: decode image `index`; the last one queues the request in the batcher."""
        try:
            image = _decoded(self._extractor, index, self._payloads[index], len(self._payloads))
        except Exception as exc:  # noqa: BLE001 - ApiError for what is not an image; a bug is answered 500
            self._end(exc)
            return
        with self._lock:
            self._images[index] = image
            self._left -= 1
            if self._left or self._ended:
                return
        try:
            parts = self._api.batcher.submit(np.stack(self._images))  # type: ignore[arg-type]  # all decoded
        except Exception as exc:  # noqa: BLE001 - QueueFull, BatcherStopped; a bug is answered 500
            self._end(exc)
            return
        with self._lock:
            self._parts, self._unanswered = parts, len(parts)
            cancelled = self._ended
        if cancelled:
            self.cancel()
            return
        for part in parts:
            part.add_done_callback(self._part_done)

    def _part_done(self, _: Future[np.ndarray]) -> None:
        """On the batcher's thread, as each batch-sized part of the request is through."""
        with self._lock:
            self._unanswered -= 1
            if self._unanswered:
                return
        try:
            result = (self._parts[0].result() if len(self._parts) == 1
                      else np.concatenate([part.result() for part in self._parts]))
        except BaseException as exc:  # noqa: BLE001 - the engine failed; or cancelled, and nobody waits
            self._end(exc)
            return
        self._end(None, result)

    def _end(self, error: BaseException | None, result: np.ndarray | None = None) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._waker.call(lambda: self._settle(error, result))

    def _settle(self, error: BaseException | None, result: np.ndarray | None) -> None:
        if self.answer.done():  # the awaiting task was cancelled
            return
        if error is not None:
            self.answer.set_exception(error)
        else:
            self.answer.set_result(result)  # type: ignore[arg-type]

    def cancel(self) -> None:
        """The caller gave up: images not yet decoded are not queued, and queued parts not yet run are dropped
        by the batcher."""
        with self._lock:
            self._ended = True
            parts = self._parts
        for part in parts:
            part.cancel()
