"""A change of backbone id under a published model (a new preprocessing version after an upgrade, other weights,
another network): the training images are cached again under the configured id by the caching thread (below
the inbox in priority, as any backfill), then a head is trained on them and swapped in (`daemon.trainer`).
Meanwhile the published model keeps serving (HTTP and inbox filing) when the engine can run it: the same
network under another preprocessing version (`Extractor.runs`); a model of another network is not served until
its successor is published.

This module only tells how far that is: `retraind_migration_info{source,target,serving}` (1 while under way) and
`retraind_migration_images{state="cached"|"total"}` (training images cached under the target id, of all usable
ones), refreshed as the caching thread finishes each chunk (at most every `REFRESH_SECONDS`), read by
`retraind status`."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from daemon.metrics import Metrics
from daemon.store import Store

if TYPE_CHECKING:
    from daemon.pipeline import Progress

log = logging.getLogger(__name__)

#: The counts are read again at most this often (one index lookup per training file)
REFRESH_SECONDS = 2.0


class Migration:
    """The migration to `target` (the configured backbone id) of a daemon whose published model has another id;
    `begin` at start-up, `refresh` from the caching thread, `end` once a model trained on `target` is published
    (any thread)."""

    def __init__(self, store: Store, metrics: Metrics, target: str) -> None:
        self._store, self._metrics, self.target = store, metrics, target
        self._lock = threading.Lock()
        self.source: str | None = None  # the published model's backbone id while under way
        self._refreshed = -float("inf")

    def begin(self, source: str, serving: bool) -> None:
        """The published model was trained on `source`; `serving`: it is served meanwhile."""
        with self._lock:
            self.source = source
            self._metrics.migration_info.labels(source=source, target=self.target,
                                                serving=str(serving).lower()).set(1)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Count the training images cached under the target id (unless counted less than `REFRESH_SECONDS`
        ago and not `force`)."""
        with self._lock:
            now = time.monotonic()
            if self.source is None or (not force and now - self._refreshed < REFRESH_SECONDS):
                return
            self._refreshed = now
            cached, total = self._store.count_cached(self.target)
            self._metrics.migration_images.labels(state="cached").set(cached)
            self._metrics.migration_images.labels(state="total").set(total)

    def end(self) -> None:
        """A model trained on the target id is published: nothing is under way any more, and the source id's
        bottlenecks are dropped (one vector per image, as large as the target's; kept versions of the source
        addressed by number are computed afresh)."""
        with self._lock:
            if self.source is None:
                return
            dropped = self._store.drop_bottlenecks(self.source)
            log.info("backbone migration from %s to %s finished; %d bottlenecks of %s dropped", self.source,
                     self.target, dropped, self.source)
            self.source = None
            self._metrics.migration_info.clear()
            self._metrics.migration_images.clear()


class MigrationProgress:
    """`progress` that also refreshes `migration` as each chunk of training images is cached."""

    def __init__(self, progress: Progress, migration: Migration) -> None:
        self._progress, self._migration = progress, migration

    def went_round(self) -> None:
        self._progress.went_round()

    def indexed(self, indexed: int, waiting: int) -> None:
        self._progress.indexed(indexed, waiting)
        self._migration.refresh(force=not waiting)
