"""The daemon as a context manager: builds every part from the config, starts the few named threads, and on
exit stops them (pipeline first, so in-flight work finishes) and joins them all."""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from threadpoolctl import threadpool_limits

from daemon import trust
from daemon.augment import Augmenter, VariantCache
from daemon.backbone import preprocessing_of
from daemon.batcher import Batcher
from daemon.config import Config, ConfigError
from daemon.engines import build_backbone, gains_from_batches, warm_up
from daemon.extractor import Extractor
from daemon.fstype import file_system
from daemon.hookspecs import hookimpl
from daemon.http.api import Api
from daemon.http.routes import make_app
from daemon.http.security import read_token
from daemon.http.server import HttpServer
from daemon.ignore import IgnoreRules
from daemon.inbox import InboxProcessor
from daemon.indexer import TrainingIndexer
from daemon.instance_lock import InstanceLock
from daemon.journal import InboxJournal
from daemon.metrics import Metrics
from daemon.migration import Migration, MigrationProgress
from daemon.pipeline import MODEL_CHANGED, STOP, NoProgress, Pipeline, Progress
from daemon.plugin_manager import PUBLISHER, Hooks
from daemon.publish import Publisher, repositories
from daemon.registry import ModelRegistry, ModelVersion
from daemon.review import Review
from daemon.review_actions import ReviewActions
from daemon.scanner import walk_files
from daemon.serving import ServingModel
from daemon.split import SPLITS
from daemon.store import STORE_FILE, Store
from daemon.trainer import Trainer
from daemon.trust import Trust, load_trust
from daemon.watcher import Watcher

log = logging.getLogger(__name__)

FOLDERS = ("classes", "inbox", "outbox", "review", "rejected", "state")
QUEUE_SIZE = 10_000


def make_folders(config: Config) -> None:
    """Create the daemon's folders. One that cannot be made (data_root is a file, or lies in a read-only or
    forbidden place) is a `ConfigError` naming its key, as any other config problem: it was a traceback."""
    for name in FOLDERS:
        folder = config.folder(name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"folders.{name}: cannot create {folder}: {exc.strerror or exc} (data_root: "
                              f"{config.data_root})") from exc


def check_state_dir(config: Config) -> None:
    """Refuse a state dir on a network or FUSE file system: SQLite's locks and write-ahead log need a local one
    (https://www.sqlite.org/wal.html: "WAL does not work over a network filesystem")."""
    state = config.folder("state")
    fs = file_system(state)
    if fs.remote:
        raise ConfigError(f"folders.state: {state} is on {fs.name}, a network or FUSE file system, where SQLite's "
                          "locking and write-ahead log are unsafe; give a folder on a local disk (an absolute "
                          "path may lie outside data_root)")


def _variant_cache(config: Config, hooks: Hooks, store: Store, extractor: Extractor) -> VariantCache:
    """The cached distorted variants of training images, with the distortions the plugins contribute."""
    augmenter = Augmenter(hooks.register_distortions(config.augmentation), config.augmentation,
                          hooks.decode_image, extractor.backbone.input_size, config.watch.max_image_pixels,
                          preprocessing_of(extractor.backbone.id))
    return VariantCache(augmenter, store, extractor, config.folder("classes"), config.watch.max_file_bytes,
                        config.backbone.batch_size)


class OneBlasThread:
    """numpy's BLAS on the calling thread only while the daemon runs. The engine's threads have every core;
    OpenBLAS's own worker threads spin for a while after each product (a head's scores, the novelty score)
    and took a core from the engine: during an inbox burst on 2 cores they used 0.37 of a core, and the
    daemon spent 18-21 ms of CPU per image against 15 ms with them held to one thread."""

    def __init__(self) -> None:
        self._limits: threadpool_limits | None = None

    def start(self) -> None:
        self._limits = threadpool_limits(limits=1, user_api="blas")

    def stop(self) -> None:
        if self._limits is not None:
            self._limits.restore_original_limits()
            self._limits = None


@dataclass(frozen=True)
class DaemonStatus:
    """What the daemon is doing, for the systemd STATUS line: the serving model's number (None before the
    first), the inbox files not classified yet, and the folder training images go to."""

    model_version: int | None
    inbox_waiting: int
    classes: Path


class App:
    """`progress` hears from the pipeline worker as it goes (the service's progress bar and watchdog)."""

    def __init__(self, config: Config, extra_plugins: Iterable[object] = (),
                 progress: Progress | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.hooks = Hooks.of(config, extra_plugins, self.metrics)
        self.hooks.pm.register(self, name="retraind-app")  # it hears of published models through the hook
        make_folders(config)
        check_state_dir(config)
        self.lock = InstanceLock(config.folder("state"), config.data_root, (config.data_root, config.folder("inbox")))
        self.lock.acquire()  # before anything reads or writes the data: one daemon per data root
        try:
            self._build(config, progress or NoProgress())
        except BaseException:
            self.lock.release()
            raise

    def _build(self, config: Config, progress: Progress) -> None:
        state = config.folder("state")
        self.backbone = build_backbone(self.hooks, config)
        if getattr(self.backbone, "fell_back_from", None) is not None:  # logged where it happened
            self.metrics.internal_error("engine_fallback")
        self.store = Store(state / STORE_FILE)
        self.migration = Migration(self.store, self.metrics, self.backbone.id)
        self.registry = ModelRegistry.of(config)
        self.serving = ServingModel()
        self.events: queue.Queue[object] = queue.Queue(maxsize=QUEUE_SIZE)
        self.extractor = Extractor(self.backbone, self.hooks.decode_image, self.store, self.metrics,
                                   config.watch.max_image_pixels, config.backbone.batch_size,
                                   self.hooks.preprocessing_versions())
        variants = _variant_cache(config, self.hooks, self.store, self.extractor)
        self.trainer = Trainer(config, self.store, self.backbone, variants, self.registry, self.serving,
                               self.hooks, self.metrics)
        self.indexer = TrainingIndexer(config.folder("classes"), self.store, self.extractor, self.metrics,
                                       config.watch.max_file_bytes, self.trainer.notify_change)
        self.journal = InboxJournal(config, self.store, self.hooks, self.metrics)
        self.inbox = InboxProcessor(config, self.journal, self.extractor, self.serving, self.hooks, self.metrics)
        self.watcher = Watcher({area: config.folder(area) for area in ("classes", "inbox")}, self.events,
                               self.metrics, config.watch)
        self.pipeline = Pipeline(config, self.events, self.hooks, self.store, self.indexer, self.inbox,
                                 self.journal, self.metrics, self.watcher.rescan_needed,
                                 MigrationProgress(progress, self.migration), self.trainer.set_backlog)
        self.review_actions = ReviewActions(self.store, self.metrics)
        self._blas = OneBlasThread()
        self.publisher = self._publisher()
        self.batcher: Batcher | None = None
        self.http: HttpServer | None = None
        if config.http.enabled:
            self._build_http()

    def _build_http(self) -> None:
        config = self.config
        urgent = functools.partial(self.extractor.embed_parts, urgent=True)  # the engine's turns: HTTP is urgent
        self.batcher = Batcher(urgent, config.http.batching, self.metrics, gains_from_batches(self.backbone))
        review = Review(config, self.store, self.serving, self.registry, self.review_actions, self.backbone.id)
        self.api = Api(config, self.metrics, self.serving, self.registry, self.extractor, self.batcher,
                       self.trainer.request_if_changed, self.health, lambda: self.serving.candidate, review,
                       lambda version: dataclasses.replace(version, trust=self._trust_of(version)))
        self.http = HttpServer(make_app(self.api, read_token(config.http)), config.http)

    def _publisher(self) -> Publisher | None:
        """The `publisher` plugin, when a serving repository is configured and it is not disabled."""
        if not repositories(self.config.publish) or self.hooks.pm.is_blocked(PUBLISHER):
            return None
        publisher = Publisher(self.config, lambda config: build_backbone(self.hooks, config), self.metrics)
        self.hooks.pm.register(publisher, name=PUBLISHER)
        return publisher

    def alive(self) -> bool:
        return self.pipeline.is_alive() and self.trainer.is_alive()

    def health(self) -> dict[str, object]:
        """/healthz: `status` is `ok`, `degraded` while a watched folder is missing (nothing put there is seen),
        or `down` when a worker thread has ended."""
        alive, missing = self.alive(), self.watcher.missing()
        status = "down" if not alive else "degraded" if missing else "ok"
        return {"alive": alive, "status": status, "missing_folders": missing}

    def status(self) -> DaemonStatus:
        """What the daemon is doing now (any thread)."""
        version = self.serving.version
        return DaemonStatus(version.number if version else None, self.pipeline.inbox_waiting,
                            self.config.folder("classes"))

    @hookimpl(tryfirst=True)
    def retraind_on_model_published(self, version: ModelVersion) -> None:
        """Show the new model in the metrics and classify the inbox files that waited for a first model."""
        self._show(version)
        if version.backbone == self.backbone.id:
            self.migration.end()
        self.events.put(MODEL_CHANGED)

    def _show(self, version: ModelVersion) -> None:
        self.metrics.known_labels(version.labels)
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
        """Serve the published model if this daemon can run it: trained on this backbone, or on the same network
        under another preprocessing version the decoder makes (served with its own until a model trained on
        this backbone replaces it: a migration, `daemon.migration`). Whether the data or settings moved on is
        the trainer's first question, on its own thread: reading the whole catalog must not delay serving."""
        try:
            version = self.registry.current()
        except (OSError, ValueError, KeyError) as exc:
            log.error("the published model %s; a new one will be trained", exc)
            self.metrics.internal_error("model_load")
            version = None
        if version is None:
            return
        served = self.extractor.runs(version.backbone)
        if served:
            version = dataclasses.replace(version, trust=self._trust_of(version))
            self.serving.swap(version)
            self._show(version)
            log.info("serving model %d (%s)", version.number, version.backbone)
        if version.backbone == self.backbone.id:
            return
        if served:
            log.warning("model %d was trained on backbone %s and the config builds %s (the same network, another "
                        "preprocessing): it keeps serving, with its own preprocessing, while the training images "
                        "are cached again under %s; a model trained on them then replaces it", version.number,
                        version.backbone, self.backbone.id, self.backbone.id)
        else:
            log.warning("model %d was trained on backbone %s, another network than the configured %s: it cannot "
                        "be served (nothing is, and inbox files wait) until the training images are cached "
                        "under %s and a model is trained on them", version.number, version.backbone,
                        self.backbone.id, self.backbone.id)
        self.migration.begin(version.backbone, served)

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
        self._blas.start()
        warm_up(self.backbone)  # before a model is served: /readyz and READY mean the first image is fast
        self._load_current()
        recovered = self.journal.recover()
        if recovered:
            log.info("finished %d inbox moves a stop interrupted", recovered)
        if finished := self.review_actions.recover():
            log.info("finished %d review decisions a stop interrupted", finished)
        self.watcher.start()  # before the scan (the pipeline's first turn), so nothing falls between the two
        if next(walk_files(self.config.folder("classes"), IgnoreRules(self.config.watch.ignore).name), None) is None:
            log.info("no training images yet: put images in %s/<label>/ (two labels or more)",
                     self.config.folder("classes"))
        self.pipeline.start()
        self.trainer.start()
        if self.publisher is not None:
            self.publisher.start()
            if self.serving.version is not None:  # published before a stop, or its export failed: catch up
                self.publisher.submit(self.serving.version)
        if self.batcher is not None and self.http is not None:
            if gains_from_batches(self.backbone):  # the batcher's largest batch too (not TFLite: one image a
                warm_up(self.backbone, self.config.http.batching.max_batch_size)  # pass; lanes made when needed)
            self.batcher.start()
            self.api.start()
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
        if self.publisher is not None and self.publisher.is_alive():
            self.publisher.stop()
            self.publisher.join()
        if self.http is not None:
            self.http.stop()
            self.api.close()
        if self.batcher is not None:
            self.batcher.stop()
        self.extractor.close()
        self.store.close()
        self._blas.stop()
        self.lock.release()

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
