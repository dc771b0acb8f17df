"""The daemon as a context manager: builds every part from the config, starts the few named threads, and on
exit stops them (pipeline first, so in-flight work finishes) and joins them all."""

from __future__ import annotations

import dataclasses
import logging
import queue
from collections.abc import Iterable
from types import TracebackType
from typing import Self

from daemon import trust
from daemon.backbone import Backbone
from daemon.config import Config, ConfigError
from daemon.dataset import manifest_of
from daemon.extractor import Extractor
from daemon.http_api import Api, HttpServer
from daemon.inbox import InboxProcessor
from daemon.indexer import TrainingIndexer
from daemon.metrics import Metrics
from daemon.pipeline import MODEL_CHANGED, STOP, Pipeline
from daemon.plugin_manager import Hooks, make_plugin_manager
from daemon.registry import ModelRegistry, ModelVersion
from daemon.serving import ServingModel
from daemon.split import SPLITS
from daemon.store import Store
from daemon.trainer import Trainer
from daemon.trust import Trust, load_trust
from daemon.watcher import Watcher

log = logging.getLogger(__name__)

FOLDERS = ("classes", "inbox", "outbox", "review", "rejected", "state")
QUEUE_SIZE = 10_000


def build_backbone(hooks: Hooks, config: Config) -> Backbone:
    cache = config.folder("state") / "weights"
    cache.mkdir(parents=True, exist_ok=True)
    backbone = hooks.make_backbone(config.backbone, cache)
    if backbone is None:
        raise ConfigError(f"backbone.name: no plugin provides {config.backbone.name!r} "
                          "(built in: efficientnet_lite0, inception_v3)")
    return backbone


class App:
    def __init__(self, config: Config, extra_plugins: Iterable[object] = ()) -> None:
        self.config = config
        self.metrics = Metrics()
        self.hooks = Hooks(make_plugin_manager(config.plugins.disable, extra_plugins), self.metrics)
        for name in FOLDERS:
            config.folder(name).mkdir(parents=True, exist_ok=True)
        state = config.folder("state")
        self.backbone = build_backbone(self.hooks, config)
        self.store = Store(state / "store.sqlite")
        self.registry = ModelRegistry.of(config)
        self.serving = ServingModel()
        self.events: queue.Queue[object] = queue.Queue(maxsize=QUEUE_SIZE)
        self.extractor = Extractor(self.backbone, self.hooks.decode_image, self.store, self.metrics,
                                   config.watch.max_image_pixels, config.backbone.batch_size)
        self.trainer = Trainer(config, self.store, self.extractor, self.registry, self.serving, self.hooks,
                               self.metrics, self._published)
        self.indexer = TrainingIndexer(config.folder("classes"), self.store, self.extractor, self.metrics,
                                       config.watch.max_file_bytes, self.trainer.notify_change)
        self.inbox = InboxProcessor(config, self.store, self.extractor, self.serving, self.hooks, self.metrics)
        self.watcher = Watcher([config.folder("classes"), config.folder("inbox")], self.events, self.metrics)
        self.pipeline = Pipeline(config, self.events, self.hooks, self.store, self.indexer, self.inbox,
                                 self.metrics, self.watcher.rescan_needed)
        api = Api(config, self.metrics, self.serving, self.extractor, self.trainer.request, self.alive)
        self.http = HttpServer(api) if config.http.enabled else None

    def alive(self) -> bool:
        return self.pipeline.is_alive() and self.trainer.is_alive()

    def _published(self, version: ModelVersion) -> None:
        self._show(version)
        self.events.put(MODEL_CHANGED)

    def _show(self, version: ModelVersion) -> None:
        self.metrics.model_version.set(version.number)
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(version=str(version.number), backbone=version.backbone).set(1)
        self.metrics.last_training.set(float(version.metrics.get("created", 0)))  # also right after a restart
        self.metrics.accuracy.clear()  # a split the new model lacks must not keep the old model's figure
        for split in SPLITS:
            value = version.metrics.get("accuracy", {}).get(split)
            if value is not None:
                self.metrics.accuracy.labels(split=split).set(value)
        trust.show(self.metrics, version)

    def _load_current(self) -> None:
        """Serve the published model if it was trained on this backbone; retrain if the data moved on."""
        try:
            version = self.registry.current()
        except (OSError, ValueError, KeyError) as exc:
            log.error("the published model cannot be loaded (%s); a new one will be trained", exc)
            version = None
        if version is not None and version.backbone == self.backbone.id:
            version = dataclasses.replace(version, trust=self._trust_of(version))
            self.serving.swap(version)
            self._show(version)
            log.info("serving model %d (%s)", version.number, version.backbone)
        entries = sorted((e for e in self.store.catalog().values() if e.ok), key=lambda e: e.path)
        if entries and (version is None or version.metrics.get("manifest_sha256") != manifest_of(entries)
                        or version.backbone != self.backbone.id or version.trust is None):
            self.trainer.notify_change()

    def _trust_of(self, version: ModelVersion) -> Trust | None:
        """The version's calibrator and novelty score; None (everything goes to review until a retrain, which
        `_load_current` asks for) when it predates them or they cannot be loaded."""
        try:
            found = load_trust(version, self.hooks)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.error("model %d: its calibration cannot be loaded (%s); retraining", version.number, exc)
            return None
        if found is None:
            log.warning("model %d has no calibration (made by an older retraind); every image goes to review "
                        "until it is retrained", version.number)
        return found

    def start(self) -> None:
        self._load_current()
        recovered = self.inbox.recover()
        if recovered:
            log.info("finished %d inbox moves a stop interrupted", recovered)
        self.watcher.start()  # before the scan, so nothing falls between the two
        self.pipeline.rescan()
        self.pipeline.start()
        self.trainer.start()
        if self.http is not None:
            self.http.start()
        log.info("retraind started: data in %s, backbone %s", self.config.data_root, self.backbone.id)

    def stop(self) -> None:
        """Stop whatever `start` got to (it may have failed half-way): the pipeline first, so the work in
        hand finishes, then the trainer; join them all."""
        self.watcher.stop()
        if self.pipeline.is_alive():
            self.events.put(STOP)
            self.pipeline.join()
        if self.trainer.is_alive():
            self.trainer.stop()
            self.trainer.join()
        if self.http is not None:
            self.http.stop()
        self.extractor.close()
        self.store.close()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
