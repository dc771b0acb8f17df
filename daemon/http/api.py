"""What the routes need from the daemon: models by version number or label, and the inference path
(decode on a thread pool, in parallel → the dynamic batcher → the version's head)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
        """Kept versions trained on the running backbone (the only ones this daemon can serve)."""
        numbers = []
        for number in self.registry.versions():
            try:
                if self.version(number).backbone == self.extractor.backbone.id:
                    numbers.append(number)
            except ApiError:
                continue
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
        if version.backbone != self.extractor.backbone.id:
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

    async def bottlenecks(self, payloads: Sequence[bytes]) -> np.ndarray:
        """Decode `payloads` in parallel off the loop, then run them through the batcher: float32 [N, dim]."""
        if not 0 < len(payloads) <= MAX_INSTANCES:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"send 1 to {MAX_INSTANCES} images, not {len(payloads)}")
        loop = asyncio.get_running_loop()
        images = await asyncio.gather(*(loop.run_in_executor(self.pool, self._decode, i, data, len(payloads))
                                        for i, data in enumerate(payloads)))
        try:
            futures = self.batcher.submit(np.stack(images))
            return np.concatenate([await asyncio.wrap_future(future) for future in futures])
        except QueueFull as exc:
            self.metrics.batch_rejections.inc()
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), {"Retry-After": str(exc.retry_after)}) from exc
        except BatcherStopped as exc:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), {"Retry-After": "5"}) from exc

    async def probabilities(self, payloads: Sequence[bytes], version: ModelVersion) -> np.ndarray:
        """Calibrated probabilities [N, labels] in `version.labels` order."""
        return trust.probabilities(version, await self.bottlenecks(payloads))

    def _decode(self, index: int, data: bytes, count: int) -> np.ndarray:
        try:
            return self.extractor.decode(data)
        except ImageRejected as exc:
            where = f"instance {index}: " if count > 1 else ""
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY,
                           f"{where}not a usable image ({exc.reason}): {exc}") from exc
