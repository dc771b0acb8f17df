"""The trainer thread: after the training set changes and the retrain policy agrees, fit a new head on the
cached bottlenecks, gate it against the serving model on the same validation images, and publish it."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from daemon.augment import Augmenter, VariantCache
from daemon.config import Config
from daemon.dataset import Dataset, Part, build_dataset
from daemon.extractor import Extractor
from daemon.head import Head, accuracy
from daemon.metrics import Metrics
from daemon.plugin_manager import Hooks
from daemon.registry import ModelRegistry, ModelVersion
from daemon.retrain_policy import RetrainState
from daemon.serving import ServingModel
from daemon.split import SPLITS, TEST, VALIDATION
from daemon.store import Store
from daemon.trust import fit_trust

log = logging.getLogger(__name__)


def evaluate(head: Head, dataset: Dataset) -> dict[str, Any]:
    """Accuracy per split and per class, and the confusion matrix (rows: true label) on test, else validation."""
    per_split = {name: accuracy(head, part.x, part.y) for name, part in dataset.parts.items()}
    part = dataset.parts[TEST] if len(dataset.parts[TEST].y) else dataset.parts[VALIDATION]
    n = len(dataset.labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    probabilities = head.probabilities(part.x) if len(part.y) else np.empty((0, n), dtype=np.float32)
    np.add.at(confusion, (part.y, probabilities.argmax(axis=1)), 1)
    per_class = {
        label: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
        for i, label in enumerate(dataset.labels)
    }
    return {"accuracy": per_split, "per_class_accuracy": per_class, "confusion_matrix": confusion.tolist(),
            "confusion_split": TEST if part is dataset.parts[TEST] else VALIDATION,
            "mistakes": _mistakes(probabilities, part, dataset.labels)}


def _mistakes(probabilities: np.ndarray, part: Part, labels: tuple[str, ...], keep: int = 20) -> list[dict[str, Any]]:
    """The most confident wrong predictions on `part`, surest first (`retraind report` shows them)."""
    predicted = probabilities.argmax(axis=1)
    score = probabilities[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != part.y)
    return [{"path": part.paths[i], "true": labels[part.y[i]], "predicted": labels[predicted[i]],
             "score": round(float(score[i]), 6)} for i in wrong[np.argsort(-score[wrong], kind="stable")][:keep]]


def _log_misclassified(head: Head, dataset: Dataset) -> None:
    """retrain.py's --print_misclassified_test_images, as log lines."""
    test = dataset.parts[TEST]
    predicted = head.probabilities(test.x).argmax(axis=1) if len(test.y) else np.empty(0, np.int64)
    wrong = np.flatnonzero(predicted != test.y)
    log.info("=== MISCLASSIFIED TEST IMAGES: %d of %d ===", len(wrong), len(test.y))
    for i in wrong:
        log.info("%s: is %s, predicted %s", test.paths[i], dataset.labels[test.y[i]],
                 dataset.labels[predicted[i]])


#: A failed run (disk full while publishing, a plugin's bug) is tried again after a growing delay.
_RETRY_FIRST_SECONDS, _RETRY_MAX_SECONDS = 10.0, 600.0


class Trainer(threading.Thread):
    def __init__(
        self, config: Config, store: Store, extractor: Extractor, registry: ModelRegistry,
        serving: ServingModel, hooks: Hooks, metrics: Metrics, on_published: Callable[[ModelVersion], None],
    ) -> None:
        super().__init__(name="retraind-trainer", daemon=False)
        self._config, self._store, self._backbone = config, store, extractor.backbone
        distortions = hooks.register_distortions(config.augmentation)
        augmenter = Augmenter(distortions, config.augmentation, hooks.decode_image,
                              extractor.backbone.input_size, config.watch.max_image_pixels)
        self._variants = VariantCache(augmenter, store, extractor, config.folder("classes"),
                                      config.watch.max_file_bytes, config.backbone.batch_size)
        self._registry, self._serving, self._hooks, self._metrics = registry, serving, hooks, metrics
        self._on_published = on_published
        self._cond = threading.Condition()
        self._stopping = False
        self._changes = 0
        self._first_change = self._last_change = 0.0
        self._forced = False
        self._failures = 0
        self._retry_at: float | None = None
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

    def request(self) -> None:
        """Train as soon as possible, whatever the policy says (API, CLI)."""
        with self._cond:
            self._forced = True
            self.notify_change()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def run(self) -> None:
        current = self._serving.version
        if current is not None and current.metrics.get("augmentation") != self._variants.augmenter.summary:
            log.info("augmentation settings differ from model %d's; retraining", current.number)
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
                                     self._config.training.quiet_period_seconds, self._forced)
            try:
                retrain = self._hooks.should_retrain(state)
            except Exception:  # a policy plugin's bug must not end the trainer thread
                log.exception("a retrain-policy plugin failed; falling back to the quiet period")
                retrain = state.quiet()
            if retrain:
                with self._cond:
                    self._changes, self._forced = 0, False
                self.train_once()

    def train_once(self) -> ModelVersion | None:
        """One training run; a failure is logged and counted, and the current model keeps serving."""
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
        entries, matrix = self._store.training_matrix(self._backbone.id, self._backbone.dim)
        dataset = build_dataset(entries, matrix, self._config.split)  # its parts are views of `matrix`
        self._update_image_gauges(dataset)
        if len(dataset.labels) < 2:
            log.info("training waits for at least two labels with images (have %d)", len(dataset.labels))
            return None
        augmented = self._variants.attach(dataset, entries, lambda: self._stopping)
        if augmented is None:
            return None  # stopping: the variants made so far are kept for the next start
        dataset = augmented
        head = self._hooks.train_head(dataset, self._config.training)
        if head is None:
            raise RuntimeError("no plugin trained a head (is the built-in softmax_head plugin disabled?)")
        metrics = self._metrics_for(head, dataset, time.perf_counter() - started)
        self._metrics.last_training.set(time.time())  # a head was trained (promoted or not)
        if self._config.training.print_misclassified_test_images:
            _log_misclassified(head, dataset)
        if not self._passes_gate(head, dataset, metrics):
            self._metrics.training_runs.labels(result="rejected").inc()
            return None
        fitted = fit_trust(head, dataset, self._hooks, self._config.training, self._config.classify,
                           {entry.path: entry.sha256 for entry in entries})
        metrics["trust"] = fitted.summary

        def artifacts(version: ModelVersion, directory: Path) -> None:
            fitted.save(directory)
            self._hooks.write_model_artifacts(version, directory, dataset, self._config)

        version = dataclasses.replace(self._registry.publish(head, dataset.labels, metrics, artifacts),
                                      trust=fitted.trust)
        if fitted.summary["reason"]:
            log.warning("model %d: %s", version.number, fitted.summary["reason"])
        self._serving.swap(version)
        self._metrics.training_runs.labels(result="promoted").inc()
        trust = fitted.summary
        log.info("model %d published: %d labels, accuracy %s; review threshold %s for precision %.2f, expected "
                 "coverage %s, calibration error %s -> %s (out-of-fold), novelty threshold %s", version.number,
                 len(version.labels), metrics["accuracy"], trust["confidence_threshold"],
                 trust["target_precision"], trust["expected_coverage"],
                 trust["calibration"]["out_of_fold"]["before"], trust["calibration"]["out_of_fold"]["after"],
                 trust["novelty"]["threshold"])
        self._hooks.on_model_published(version)
        self._on_published(version)
        return version

    def _metrics_for(self, head: Head, dataset: Dataset, seconds: float) -> dict[str, Any]:
        return {
            **evaluate(head, dataset), "backbone": self._backbone.id, "labels": list(dataset.labels),
            "images": dataset.counts(), "manifest_sha256": dataset.manifest_sha256,
            "labels_without_training_split": list(dataset.borrowed), "hyperparameters": head.hyperparameters,
            "augmentation": self._variants.augmenter.summary,
            "variant_rows": 0 if dataset.variants is None else len(dataset.variants.y),
            "history": head.history, "training_seconds": round(seconds, 4), "created": time.time(),
        }

    def _passes_gate(self, head: Head, dataset: Dataset, metrics: dict[str, Any]) -> bool:
        """A new head must not be worse than the serving one on the same validation images; a serving model
        with another label set or backbone is another task, and is never compared."""
        current = self._serving.version
        validation = dataset.parts[VALIDATION]
        if current is None or current.labels != dataset.labels or current.backbone != self._backbone.id:
            return True
        if not len(validation.y):
            return True
        old = accuracy(current.head, validation.x, validation.y) or 0.0
        new = metrics["accuracy"][VALIDATION] or 0.0
        metrics["gate"] = {"previous_version": current.number, "previous_accuracy": old, "accuracy": new}
        if new + self._config.training.gate_tolerance < old:
            log.warning("new head not promoted: validation accuracy %.4f < %.4f of model %d",
                        new, old, current.number)
            return False
        return True

    def _update_image_gauges(self, dataset: Dataset) -> None:
        self._metrics.images.clear()
        for label, per_split in dataset.counts().items():
            for split in SPLITS:
                self._metrics.images.labels(label=label, split=split).set(per_split[split])
