"""The trainer thread: after the training set changes and the retrain policy agrees, fit a new head on the
cached bottlenecks, gate it against the serving model on the same validation images, and publish it."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

from daemon.augment import VariantCache
from daemon.backbone import Backbone
from daemon.config import Config
from daemon.dataset import Dataset, build_dataset, manifest_of
from daemon.evaluation import evaluate, gate, log_misclassified
from daemon.head import Head
from daemon.metrics import Metrics
from daemon.plugin_manager import Hooks
from daemon.registry import ModelRegistry, ModelVersion
from daemon.retrain_policy import RetrainState
from daemon.serving import ServingModel
from daemon.split import SPLIT_RULE, SPLITS, VALIDATION
from daemon.store import CatalogEntry, Store
from daemon.trust import TrustFit

log = logging.getLogger(__name__)


_CONFLICTS_LOGGED = 10


def _log_conflicts(dataset: Dataset) -> None:
    """The same bytes under two labels teach the head both answers for one picture: say where, every run."""
    for conflict in dataset.conflicts[:_CONFLICTS_LOGGED]:
        log.warning("the same image is under labels %s: %s (sha256 %s)", ", ".join(conflict.labels),
                    ", ".join(conflict.paths), conflict.sha256[:12])
    if len(dataset.conflicts) > _CONFLICTS_LOGGED:
        log.warning("... and %d more images under two labels (metrics.json: label_conflicts)",
                    len(dataset.conflicts) - _CONFLICTS_LOGGED)


#: `training` settings that do not change the head a run fits: a change of these needs no retraining
_NOT_HEAD_SETTINGS = frozenset({"quiet_period_seconds", "keep_versions", "gate_tolerance",
                                "print_misclassified_test_images", "tensorboard"})
#: A failed run (disk full while publishing, a plugin's bug) is tried again after a growing delay.
_RETRY_FIRST_SECONDS, _RETRY_MAX_SECONDS = 10.0, 600.0


@dataclasses.dataclass(frozen=True)
class _Preloaded:
    """The training set as loaded at a store generation (`Store.generation`, on the trainer's thread)."""

    generation: tuple[int, int, int]
    entries: list[CatalogEntry]
    dataset: Dataset


class Trainer(threading.Thread):
    def __init__(
        self, config: Config, store: Store, backbone: Backbone, variants: VariantCache, registry: ModelRegistry,
        serving: ServingModel, hooks: Hooks, metrics: Metrics,
    ) -> None:
        super().__init__(name="retraind-trainer", daemon=False)
        self._config, self._store, self._backbone, self._variants = config, store, backbone, variants
        self._registry, self._serving, self._hooks, self._metrics = registry, serving, hooks, metrics
        self._cond = threading.Condition()
        self._stopping = False
        self._changes = 0
        self._first_change = self._last_change = 0.0
        self._forced = False
        self._backlog = 0
        self._failures = 0
        self._retry_at: float | None = None
        self._prepared = False
        self._preloaded: _Preloaded | None = None
        self._preloaded_for = 0.0  # the last change the quiet period's preload was made after
        self.runs = 0  # finished runs, whatever their result

    def notify_change(self) -> None:
        """The training set changed (any thread); restarts the quiet period."""
        with self._cond:
            now = time.monotonic()
            if not self._changes:
                self._first_change = now
            self._changes += 1
            self._last_change = now
            self._cond.notify()

    def set_backlog(self, waiting: int) -> None:
        """How many training files are seen and not yet cached (the pipeline, after every turn)."""
        self._backlog = waiting

    def request(self) -> None:
        """Train as soon as possible, whatever the policy says."""
        with self._cond:
            self._forced = True
            self.notify_change()

    def request_if_changed(self) -> ModelVersion | None:
        """`retraind retrain` (the API): `request()`, unless the serving model was trained on exactly the
        current training set and settings: then nothing is queued (a run could only publish the same head
        again) and that model is returned."""
        current = self._serving.version
        if current is not None and self.trained_on_current(current):
            log.info("retrain asked for, but the training set is unchanged since model %d: nothing new to "
                     "publish", current.number)
            return current
        self.request()
        return None

    def trained_on_current(self, version: ModelVersion) -> bool:
        """`version` was trained on this backbone, on exactly the training images in the catalog now, with the
        augmentation, head settings, target precision and novelty false-alarm rate in force now, and its
        calibration is loaded."""
        entries = sorted((e for e in self._store.catalog().values() if e.ok), key=lambda e: e.path)
        m = version.metrics
        trust = m.get("trust") or {}
        return (version.trust is not None and version.backbone == self._backbone.id and m.get("manifest_sha256") == manifest_of(entries)
                and m.get("augmentation") == self._variants.augmenter.summary
                and m.get("training_settings") == self._head_settings()
                and trust.get("target_precision") == self._config.classify.target_precision
                and (trust.get("novelty") or {}).get("false_alarm_rate") == self._config.classify.novelty_false_alarm_rate)

    def _head_settings(self) -> dict[str, Any]:
        """The `training` settings that shape the head (not when, how often, or what is kept and shown)."""
        settings = dataclasses.asdict(self._config.training)
        return {key: value for key, value in settings.items() if key not in _NOT_HEAD_SETTINGS}

    def prepare(self) -> None:
        """Get ready for the next run, on the thread that will train: load what a fit needs
        (`retraind_on_training_pending`: SciPy for the built-in plugins, once per trainer), then load and split
        the training set unless the store is unchanged since the last load (`Store.generation`). The trainer
        thread does it while a quiet period runs, so the run does not pay for it; the run loads again if
        anything was committed since."""
        self._load_plugins()
        self._preload()

    def _load_plugins(self) -> None:
        """`retraind_on_training_pending`, once. The trainer thread calls it while a quiet period runs, and not
        while training images wait to be cached: SciPy's import (~0.5 s of CPU, most of it holding the GIL)
        slowed the forward passes of a fill's first seconds, whose thread takes the GIL back after every image."""
        if not self._prepared:
            self._prepared = True
            self._hooks.on_training_pending()

    def _preload(self) -> _Preloaded:
        generation = self._store.generation()  # before the read: a commit racing it makes the next one differ
        if self._preloaded is None or self._preloaded.generation != generation:
            self._preloaded = None  # released before the next load: never two training matrices at once
            entries, matrix = self._store.training_matrix(self._backbone.id, self._backbone.dim)
            dataset = build_dataset(entries, matrix, self._config.split)  # its parts are views of `matrix`
            self._preloaded = _Preloaded(generation, entries, dataset)
        return self._preloaded

    def _preload_when_half_quiet(self, state: RetrainState) -> None:
        """`prepare()` once per quiet period, when half of it has passed with nothing waiting to be cached
        (a load per change while images stream in would be wasted); a preload older than the last change is
        dropped (its memory is not held while the training set changes)."""
        if self._preloaded is not None and self._preloaded_for != state.last_change:
            self._preloaded = None
        if (self._preloaded_for == state.last_change or state.waiting
                or state.now - state.last_change < state.quiet_period_seconds / 2):
            return
        self._preloaded_for = state.last_change
        try:
            self.prepare()
        except Exception:  # the run loads again, and reports what fails
            log.exception("could not load the training set ahead of the run")
            self._metrics.internal_error("training_preload")

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def run(self) -> None:
        try:
            self._check_current()
        except Exception:  # an unreadable catalog must not end the trainer thread: a run will tell more
            log.exception("cannot tell whether the serving model is current; retraining")
            self._metrics.internal_error("model_load")
            self.notify_change()
        while True:
            with self._cond:
                self._cond.wait(timeout=0.25)
                if self._stopping:
                    return
                if self._retry_at is not None and time.monotonic() >= self._retry_at:
                    self._retry_at = None
                    self.notify_change()
                if not self._changes:
                    continue
                state = RetrainState(self._first_change, self._last_change, time.monotonic(), self._changes,
                                     self._config.training.quiet_period_seconds,
                                     self._forced and not self._recaching(), self._backlog)
            if not state.waiting:
                self._load_plugins()
            try:
                retrain = self._hooks.should_retrain(state)
            except Exception:  # a policy plugin's bug must not end the trainer thread
                log.exception("a retrain-policy plugin failed; falling back to the quiet period")
                self._metrics.internal_error("retrain_policy")
                retrain = state.quiet()
            if retrain:
                with self._cond:
                    self._changes, self._forced = 0, False
                self.train_once()
            else:
                self._preload_when_half_quiet(state)

    def _recaching(self) -> bool:
        """The serving model was trained on another backbone id and training images still wait to be cached
        under this one: a forced run waits for them (a head trained on part of the set would replace it)."""
        version = self._serving.version
        return version is not None and version.backbone != self._backbone.id and self._backlog > 0

    def _check_current(self) -> None:
        """Retrain if the serving model is not what the stored training set and settings would give (or there
        is none and there are images). Here, on the trainer thread, not at start-up: reading the whole catalog
        must not delay serving the last model."""
        version = self._serving.version
        if version is not None and not self.trained_on_current(version):
            log.info("model %d was trained on other images, another backbone or other settings, or has no "
                     "calibration; retraining", version.number)
            self.notify_change()
        elif version is None and any(e.ok for e in self._store.catalog().values()):
            self.notify_change()

    def train_once(self) -> ModelVersion | None:
        """One training run; a failure is logged and counted, and the current model keeps serving. A new
        version is announced (`retraind_on_model_published`) once the run is over and counted: what plugins
        do then (the pictures) neither delays the model nor counts as training."""
        self._load_plugins()
        version = self._run_once()
        if version is not None:
            self._hooks.on_model_published(version)
        return version

    def _run_once(self) -> ModelVersion | None:
        started = time.perf_counter()
        try:
            version = self._train(started)
        except Exception:
            self._failures += 1
            delay = min(_RETRY_FIRST_SECONDS * 2 ** (self._failures - 1), _RETRY_MAX_SECONDS)
            self._retry_at = time.monotonic() + delay
            log.exception("training failed; the current model keeps serving; retrying in %.0f s", delay)
            self._metrics.training_runs.labels(result="failed").inc()
            return None
        else:
            self._failures = 0
            return version
        finally:
            self.runs += 1
            self._metrics.training_seconds.observe(time.perf_counter() - started)

    def _train(self, started: float) -> ModelVersion | None:
        dataset = self._dataset()
        if dataset is None:
            return None
        with TrustFit(dataset, self._hooks) as trust_fit:  # its novelty fits run beside the head's fit
            return self._train_head(started, dataset, trust_fit)

    def _train_head(self, started: float, dataset: Dataset, trust_fit: TrustFit) -> ModelVersion | None:
        head = self._hooks.train_head(dataset, self._config.training)
        if head is None:
            raise RuntimeError("no plugin trained a head (is the built-in softmax_head plugin disabled?)")
        metrics = self._metrics_for(head, dataset, time.perf_counter() - started)
        self._metrics.last_training.set(time.time())  # a head was trained (promoted or not)
        if self._config.training.print_misclassified_test_images:
            log_misclassified(head, dataset)
        verdict = gate(self._serving.version, dataset, metrics["accuracy"][VALIDATION], self._backbone.id,
                       self._config.training.gate_tolerance)
        if verdict.record is not None:
            metrics["gate"] = verdict.record
        if not verdict.promote:
            self._metrics.training_runs.labels(result="rejected").inc()
            # kept in memory for the HTTP API's `candidate` label, numbered as it would have been published
            number = max(self._registry.versions(), default=0) + 1
            self._serving.candidate = ModelVersion(number, self._registry.root / str(number), dataset.labels,
                                                   self._backbone.id, head, {**metrics, "version": number})
            return None
        return self._publish(head, dataset, metrics, trust_fit)

    def _dataset(self) -> Dataset | None:
        """The training set with its augmented rows (the one `prepare` loaded, unless the store changed since);
        None when there is nothing to train on, or on a stop."""
        preloaded, self._preloaded = self._preload(), None  # the run's own: not held after it
        entries, dataset = preloaded.entries, preloaded.dataset
        self._update_image_gauges(dataset)
        _log_conflicts(dataset)
        if len(dataset.labels) < 2:
            log.info("training waits for images of two labels or more (have: %s): put them in %s/<label>/",
                     ", ".join(dataset.labels) or "none", self._config.folder("classes"))
            return None
        # None when stopping: the variants made so far are kept for the next start
        return self._variants.attach(dataset, entries, lambda: self._stopping)

    def _publish(self, head: Head, dataset: Dataset, metrics: dict[str, Any], trust_fit: TrustFit) -> ModelVersion:
        """Calibrate the head and derive its thresholds (daemon/trust.py), then publish and serve it."""
        fitted = trust_fit.finish(head, self._config.training, self._config.classify, self._store.hashes())
        metrics["trust"] = fitted.summary

        def artifacts(version: ModelVersion, directory: Path) -> None:
            fitted.save(directory)
            self._hooks.write_model_artifacts(version, directory, dataset, self._config)

        version = dataclasses.replace(self._registry.publish(head, dataset.labels, metrics, artifacts),
                                      trust=fitted.trust)
        if fitted.summary["reason"]:
            log.warning("model %d: %s", version.number, fitted.summary["reason"])
        self._serving.swap(version)
        self._serving.candidate = None  # its number is taken now; the promoted version supersedes it
        self._metrics.training_runs.labels(result="promoted").inc()
        trust = fitted.summary
        log.info("model %d published: %d labels, accuracy %s; review threshold %s for precision %.2f, expected "
                 "coverage %s, calibration error %s -> %s (out-of-fold), novelty threshold %s", version.number,
                 len(version.labels), _per_split(metrics["accuracy"]), trust["confidence_threshold"],
                 trust["target_precision"], trust["expected_coverage"],
                 trust["calibration"]["out_of_fold"]["before"], trust["calibration"]["out_of_fold"]["after"],
                 trust["novelty"]["threshold"])
        return version

    def _metrics_for(self, head: Head, dataset: Dataset, seconds: float) -> dict[str, Any]:
        return {
            **evaluate(head, dataset), "backbone": self._backbone.id, "labels": list(dataset.labels),
            "images": dataset.counts(), "manifest_sha256": dataset.manifest_sha256,
            "labels_without_training_split": list(dataset.borrowed), "hyperparameters": head.hyperparameters,
            "split_rule": SPLIT_RULE, "label_conflicts": [conflict.record() for conflict in dataset.conflicts],
            "augmentation": self._variants.augmenter.summary,
            "training_settings": self._head_settings(),
            "variant_rows": 0 if dataset.variants is None else len(dataset.variants.y),
            "history": head.history, "training_seconds": round(seconds, 4), "created": time.time(),
        }

    def _update_image_gauges(self, dataset: Dataset) -> None:
        self._metrics.label_conflicts.set(len(dataset.conflicts))
        self._metrics.images.clear()
        for label, per_split in dataset.counts().items():
            for split in SPLITS:
                self._metrics.images.labels(label=label, split=split).set(per_split[split])


def _per_split(accuracy: dict[str, float | None]) -> str:
    """`{"train": 1.0, "validation": 0.9, "test": None}` as "train 1.000, validation 0.900, test none"."""
    return ", ".join(f"{split} {'none' if value is None else f'{value:.3f}'}" for split, value in accuracy.items())
