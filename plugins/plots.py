"""Pictures of every model version: `training_curve.png` (train and validation accuracy and loss per L-BFGS
iteration, from the head's history; the seed plotted the same per epoch) and `confusion_matrix.png` (rows:
true label, columns: predicted, on the split `metrics.json` names).

Drawn on matplotlib's Agg canvas through the object API, never pyplot: the trainer thread then touches no
global figure state, and no display is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from daemon.hookspecs import hookimpl
from daemon.registry import ModelVersion

TRAINING_CURVE, CONFUSION_MATRIX = "training_curve.png", "confusion_matrix.png"
_DPI = 110
_MAX_ANNOTATED_LABELS = 30  # above this, numbers in the cells would be unreadable; the colours still tell


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _segments(l2: list[float]) -> list[tuple[int, float]]:
    """(first point, strength) of each L2 strength along the fitting path."""
    return [(i, value) for i, value in enumerate(l2) if i == 0 or value != l2[i - 1]]


def write_training_curve(history: dict[str, list[float]], version: int, path: Path) -> None:
    """Accuracy and loss (log scale: cross-entropy falls by orders of magnitude) along the whole fitting path,
    with a dotted line where the next L2 strength takes over from the previous fit."""
    count = len(history.get("train_loss", []))
    steps = "step" in history
    x = np.asarray(history["step"]) + 1 if steps else np.arange(1, count + 1)
    figure = _figure(10, 4.4)
    axes_pair = figure.subplots(1, 2)
    for axes, metric, title in zip(axes_pair, ("accuracy", "loss"), ("Accuracy", "Cross-entropy loss")):
        for split, style in (("train", "-"), ("validation", "--")):
            values = history.get(f"{split}_{metric}", [])
            if values:
                axes.plot(x[: len(values)], values, style, label=split)
        for start, strength in _segments(history.get("l2", [])):
            axes.axvline(x[start], color="grey", linestyle=":", linewidth=1)
            if metric == "accuracy":  # its bottom stays empty once training starts; the loss plot's does not
                axes.annotate(f"l2={strength:g}", (x[start], 0), xycoords=("data", "axes fraction"),
                              xytext=(3, 4), textcoords="offset points", fontsize=8, color="grey")
        axes.set_title(title)
        axes.set_xlabel("training step" if steps else "L-BFGS iteration")
        axes.grid(alpha=0.3)
    axes_pair[0].set_ylim(0, 1.05)
    axes_pair[1].set_yscale("log")
    handles, labels = axes_pair[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2)
    figure.suptitle(f"Model {version}: training curve")
    figure.savefig(path)


def write_confusion_matrix(matrix: np.ndarray, labels: tuple[str, ...], split: str, version: int,
                           path: Path) -> None:
    """Cells coloured by the fraction of each true label's images, annotated with counts."""
    n = len(labels)
    side = min(4 + 0.5 * n, 24)
    figure = _figure(side + 1.5, side)
    axes = figure.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true label's images")
    axes.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(n), labels)
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    if n <= _MAX_ANNOTATED_LABELS:
        for (row, col), count in np.ndenumerate(matrix):
            colour = "white" if fractions[row, col] > 0.5 else "black"
            axes.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=9)
    axes.set_title(f"Model {version}: confusion matrix ({split} split, {int(matrix.sum())} images)")
    figure.savefig(path)


@hookimpl
def retraind_write_model_artifacts(version: ModelVersion, directory: Path) -> None:
    if version.head.history:
        write_training_curve(version.head.history, version.number, directory / TRAINING_CURVE)
    matrix = np.asarray(version.metrics.get("confusion_matrix") or [], dtype=np.int64)
    if matrix.size:
        split = str(version.metrics.get("confusion_split", "test"))
        write_confusion_matrix(matrix, version.labels, split, version.number, directory / CONFUSION_MATRIX)
