"""Continuous publishing: every promoted version, exported as a SavedModel (daemon/export.py), appears in the
folders serving fleets watch, so N TF Serving or Triton replicas follow one trainer.

- `publish.tf_serving_base_path`: `<base>/retraind/<n>/` (TF Serving's file-system source polls `<base>/retraind`).
- `publish.triton_model_repository`: `<repo>/retraind/config.pbtxt` and `<repo>/retraind/<n>/model.savedmodel/`
  (Triton's model repository, TensorFlow backend; its repository poller or an explicit load picks it up).

A version folder is built under a temporary name in the model folder and renamed in whole, so a poller never
sees half a model; the last `training.keep_versions` stay. Exports run on the `retraind-publisher` thread, off
the classification path: the trainer only enqueues. A version superseded while an export runs is skipped (the
newest is what fleets serve). A failed export is logged, counted in `retraind_publish_failures_total` and
retried after 10 s, doubling up to 10 min; promotion never waits for it. TensorFlow is imported only on that
thread, when an export runs; the exporting network is the backbone's Keras engine, built once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.atomic import TMP_PREFIX, fsync_tree, write_atomic
from daemon.backbone import network_of
from daemon.config import Config, ConfigError, PublishConfig
from daemon.hookspecs import hookimpl
from daemon.metrics import Metrics
from daemon.registry import ModelVersion, prune_versions

log = logging.getLogger(__name__)

MODEL_NAME = "retraind"
#: In every published version folder: which model version it holds, so a restart re-publishes nothing
MARKER = "retraind-version.json"
_RETRY_FIRST_SECONDS, _RETRY_MAX_SECONDS = 10.0, 600.0
_STOP = object()


def triton_config(config: PublishConfig) -> str:
    """Triton's `config.pbtxt` for the SavedModel's `serving_default`: a batch of encoded files (BYTES, one per
    request row) in, float32 probabilities (one per label; the count may change between versions) out."""
    from daemon.export import INPUT, OUTPUT

    return f"""name: "{MODEL_NAME}"
platform: "tensorflow_savedmodel"
max_batch_size: {config.max_batch_size}
input [
  {{
    name: "{INPUT}"
    data_type: TYPE_STRING
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }}
]
output [
  {{
    name: "{OUTPUT}"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {config.batch_timeout_micros}
}}
version_policy: {{ latest: {{ num_versions: 1 }} }}
"""


@dataclass(frozen=True)
class Repository:
    """One serving fleet's model folder `models` (`<root>/retraind`): version `n` is `<models>/<n>/<inner>`,
    with `config` (Triton's `config.pbtxt`) beside the versions when there is one."""

    kind: str
    models: Path
    inner: str = ""
    config: str | None = None

    def holds(self, version: ModelVersion) -> bool:
        try:
            marker = json.loads((self.models / str(version.number) / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return bool(marker == _marker(version))

    def place(self, saved_model: Path, version: ModelVersion, keep: int) -> None:
        """Put a copy of the SavedModel folder `saved_model` in as version `version.number`, whole."""
        from daemon.export import replace_dir

        self.models.mkdir(parents=True, exist_ok=True)
        tmp = self.models / f"{TMP_PREFIX}{version.number}-{time.time_ns()}"
        try:
            shutil.copytree(saved_model, tmp / self.inner if self.inner else tmp)
            (tmp / MARKER).write_text(json.dumps(_marker(version)), encoding="utf-8")
            fsync_tree(tmp)
            if self.config is not None:
                write_atomic(self.models / "config.pbtxt", self.config.encode())
            replace_dir(tmp, self.models / str(version.number))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        prune_versions(self.models, keep, version.number)


def _marker(version: ModelVersion) -> dict[str, Any]:
    return {"version": version.number, "backbone": version.backbone, "created": version.metrics.get("created")}


def published_line(number: int, placed: list[Repository], seconds: float) -> str:
    """The log line of a version placed in `placed`, `seconds` after its promotion, e.g. "model 3 published to
    tf_serving (/srv/tf/retraind/3) and triton (/srv/triton/retraind/3), 4.2 s after its promotion"."""
    where = [f"{r.kind} ({r.models / str(number)})" for r in placed]
    joined = where[0] if len(where) == 1 else f"{', '.join(where[:-1])} and {where[-1]}"
    return f"model {number} published to {joined}, {seconds:.1f} s after its promotion"


def repositories(config: PublishConfig) -> list[Repository]:
    """The configured repositories (none when both paths are empty)."""
    found = []
    if config.tf_serving_base_path:
        found.append(Repository("tf_serving", Path(config.tf_serving_base_path) / MODEL_NAME))
    if config.triton_model_repository:
        found.append(Repository("triton", Path(config.triton_model_repository) / MODEL_NAME, "model.savedmodel",
                                triton_config(config)))
    return found


class Publisher(threading.Thread):
    """The `retraind-publisher` thread; registered as the `publisher` plugin, so it hears of every promotion
    through `retraind_on_model_published` (`plugins.disable: [publisher]` switches it off)."""

    def __init__(self, config: Config, make_backbone: Callable[[Config], Any], metrics: Metrics) -> None:
        super().__init__(name="retraind-publisher", daemon=False)
        self._config = config
        self._repositories = repositories(config.publish)
        self._make_backbone = make_backbone
        self._backbone: Any = None
        self._metrics = metrics
        self._queue: queue.Queue[object] = queue.Queue()
        for repository in self._repositories:
            metrics.published_version.labels(repository=repository.kind).set(0)
            metrics.publish_failures.labels(repository=repository.kind)

    @hookimpl
    def retraind_on_model_published(self, version: ModelVersion) -> None:
        self.submit(version)

    def submit(self, version: ModelVersion) -> None:
        """Export `version` soon (any thread; returns at once)."""
        self._queue.put((version, time.monotonic()))

    def stop(self) -> None:
        self._queue.put(_STOP)

    def run(self) -> None:
        for leftover in self._config.folder("state").glob(f"{TMP_PREFIX}export-*"):  # a crash mid-export
            shutil.rmtree(leftover, ignore_errors=True)
        pending: tuple[ModelVersion, float] | None = None
        delay = _RETRY_FIRST_SECONDS
        while True:
            try:
                item = self._queue.get(timeout=None if pending is None else delay)
            except queue.Empty:
                item = pending  # the retry is due
            if item is _STOP:
                return
            while not self._queue.empty():  # superseded versions are skipped; a stop still wins
                newer = self._queue.get()
                if newer is _STOP:
                    return
                item = newer
            assert isinstance(item, tuple)
            if self.publish(*item):
                pending, delay = None, _RETRY_FIRST_SECONDS
            else:
                pending, delay = item, (delay if pending is None else min(delay * 2, _RETRY_MAX_SECONDS))

    def publish(self, version: ModelVersion, promoted: float) -> bool:
        """Export `version` to every repository that lacks it; False when one failed (it is retried)."""
        missing = [r for r in self._repositories if not r.holds(version)]
        if not missing:
            return True
        if not version.directory.is_dir():
            log.info("model %d was pruned before its export; skipped", version.number)
            return True
        scratch = self._config.folder("state") / f"{TMP_PREFIX}export-{version.number}-{time.time_ns()}"
        try:
            try:
                self._export(version, scratch)
            except Exception:
                log.exception("model %d could not be exported; retried later", version.number)
                for repository in missing:
                    self._failed(repository)
                return False
            placed = [r for r in missing if self._place(r, version, scratch, promoted)]  # each, whatever the others do
            if placed:
                log.info("%s", published_line(version.number, placed, time.monotonic() - promoted))
            return len(placed) == len(missing)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _export(self, version: ModelVersion, scratch: Path) -> None:
        from daemon.export import keras_network, write_saved_model

        if self._backbone is None:
            keras = dataclasses.replace(self._config.backbone, engine="keras")
            self._backbone = keras_network(self._make_backbone(dataclasses.replace(self._config, backbone=keras)))
        if network_of(self._backbone.id) != network_of(version.backbone):  # the SavedModel decodes in its graph
            raise ConfigError(f"model {version.number} was trained on {version.backbone}, but the configured "
                              f"backbone is {self._backbone.id}")
        started = time.perf_counter()
        write_saved_model(version, self._backbone, scratch)
        log.info("model %d exported as a SavedModel in %.1f s", version.number, time.perf_counter() - started)

    def _place(self, repository: Repository, version: ModelVersion, scratch: Path, promoted: float) -> bool:
        try:
            repository.place(scratch, version, self._config.training.keep_versions)
        except Exception:
            log.exception("model %d could not be placed in %s; retried later", version.number, repository.models)
            self._failed(repository)
            return False
        self._metrics.published_version.labels(repository=repository.kind).set(version.number)
        self._metrics.publish_seconds.labels(repository=repository.kind).observe(time.monotonic() - promoted)
        return True

    def _failed(self, repository: Repository) -> None:
        self._metrics.publish_failures.labels(repository=repository.kind).inc()
