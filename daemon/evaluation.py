"""Evaluation of a trained head on the held-out splits, and the promotion gate: a new head must not be worse
than the serving one on the same validation images."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.dataset import Dataset, Part
from daemon.head import Head, accuracy
from daemon.registry import ModelVersion
from daemon.split import SPLIT_RULE, TEST, VALIDATION

log = logging.getLogger(__name__)

#: The most confident mistakes kept in `metrics.json` (`retraind report` shows them as thumbnails).
MISTAKES_KEPT = 20


def evaluate(head: Head, dataset: Dataset) -> dict[str, Any]:
    """Accuracy per split (a fraction, None for an empty split) and per class, the confusion matrix (rows:
    true label, columns: predicted) and the most confident mistakes, on test, else validation."""
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


def _mistakes(probabilities: np.ndarray, part: Part, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """The most confident wrong predictions on `part`, surest first."""
    predicted = probabilities.argmax(axis=1)
    score = probabilities[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != part.y)
    surest = wrong[np.argsort(-score[wrong], kind="stable")][:MISTAKES_KEPT]
    return [{"path": part.paths[i], "true": labels[part.y[i]], "predicted": labels[predicted[i]],
             "score": round(float(score[i]), 6)} for i in surest]


def log_misclassified(head: Head, dataset: Dataset) -> None:
    """retrain.py's --print_misclassified_test_images, as log lines."""
    test = dataset.parts[TEST]
    predicted = head.probabilities(test.x).argmax(axis=1) if len(test.y) else np.empty(0, np.int64)
    wrong = np.flatnonzero(predicted != test.y)
    log.info("=== MISCLASSIFIED TEST IMAGES: %d of %d ===", len(wrong), len(test.y))
    for i in wrong:
        log.info("%s: is %s, predicted %s", test.paths[i], dataset.labels[test.y[i]],
                 dataset.labels[predicted[i]])


@dataclass(frozen=True)
class GateVerdict:
    """Whether a new head may be published; `record` (the old and new validation accuracy) goes into its
    `metrics.json` as `gate` when the two were compared."""

    promote: bool
    record: dict[str, Any] | None = None


def gate(current: ModelVersion | None, dataset: Dataset, new_accuracy: float | None, backbone_id: str,
         tolerance: float) -> GateVerdict:
    """Compare the new head's validation accuracy with the serving model's on the same images. A serving
    model with another label set, backbone or split rule (each would be scored on images the other trained on)
    is another task, and is never compared; nor is anything without validation images. The new head may be up
    to `tolerance` (a fraction) worse."""
    validation = dataset.parts[VALIDATION]
    if (current is None or current.labels != dataset.labels or current.backbone != backbone_id
            or current.metrics.get("split_rule") != SPLIT_RULE):
        return GateVerdict(True)
    if not len(validation.y):
        return GateVerdict(True)
    old = accuracy(current.head, validation.x, validation.y) or 0.0
    new = new_accuracy or 0.0
    record = {"previous_version": current.number, "previous_accuracy": old, "accuracy": new}
    if new + tolerance < old:
        log.warning("new head not promoted: validation accuracy %.4f < %.4f of model %d", new, old, current.number)
        return GateVerdict(False, record)
    return GateVerdict(True, record)
