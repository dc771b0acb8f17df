"""Pictures of every model version: `training_curve.png` (train and validation accuracy and loss per L-BFGS
iteration, from the head's history; the seed plotted the same per epoch) and `confusion_matrix.png` (rows:
true label, columns: predicted, on the split `metrics.json` names).

Drawn on matplotlib's Agg canvas through the object API, never pyplot: the trainer thread then touches no
global figure state, and no display is needed. Drawn once the version is published and serving (about 0.8 s
of the trainer thread), so pictures never delay a model; each file appears whole (written atomically)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from daemon.atomic import write_atomic
from daemon.hookspecs import hookimpl
from daemon.registry import CONFUSION_MATRIX_FILE, TRAINING_CURVE_FILE, ModelVersion

_DPI = 110
_MAX_ANNOTATED_LABELS = 30  # above this, numbers in the cells would be unreadable; the colours still tell


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _mark_l2(axes: Any, x: np.ndarray, l2: list[float], annotate: bool) -> None:
    """A dotted line where each L2 strength's fit starts (each warm-starts from the previous one's result);
    nothing for a single fit."""
    starts = [i for i in range(1, len(l2)) if l2[i] != l2[i - 1]]
    for i in [0, *starts] if starts else []:
        axes.axvline(x[i], color="grey", linestyle=":", linewidth=1)
        if annotate:
            axes.annotate(f"l2={l2[i]:g}", (x[i], 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                          textcoords="offset points", fontsize=8, color="grey")


def _plot_metric(axes: Any, history: dict[str, list[float]], x: np.ndarray, metric: str, title: str) -> None:
    for split, style in (("train", "-"), ("validation", "--")):
        values = history.get(f"{split}_{metric}", [])
        if values:
            axes.plot(x[: len(values)], values, style, label=split)
    axes.set_title(title)
    axes.set_xlabel("training step" if "step" in history else "L-BFGS iteration")
    axes.grid(alpha=0.3)


def write_training_curve(history: dict[str, list[float]], version: int, path: Path) -> None:
    """Accuracy and loss (log scale: cross-entropy falls by orders of magnitude) along the whole fitting path."""
    count = len(history.get("train_loss", []))
    x = np.asarray(history["step"]) if "step" in history else np.arange(1, count + 1)  # updates done
    figure = _figure(10, 4.4)
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    _plot_metric(accuracy_axes, history, x, "accuracy", "Accuracy")
    _plot_metric(loss_axes, history, x, "loss", "Cross-entropy loss")
    _mark_l2(accuracy_axes, x, history.get("l2", []), annotate=True)  # its bottom stays empty; the loss
    _mark_l2(loss_axes, x, history.get("l2", []), annotate=False)  # plot's does not
    accuracy_axes.set_ylim(0, 1.05)
    loss_axes.set_yscale("log")
    figure.legend(*accuracy_axes.get_legend_handles_labels(), loc="outside lower center", ncols=2)
    figure.suptitle(f"Model {version}: training curve")
    _save(figure, path)


def write_confusion_matrix(matrix: np.ndarray, labels: tuple[str, ...], split: str, version: int,
                           path: Path) -> None:
    """Cells coloured by the fraction of each true label's images, annotated with counts."""
    n = len(labels)
    side = min(4 + 0.5 * n, 16)
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
    _save(figure, path)


@hookimpl
def retraind_on_model_published(version: ModelVersion) -> None:
    directory = version.directory
    if version.head.history:
        write_training_curve(version.head.history, version.number, directory / TRAINING_CURVE_FILE)
    matrix = np.asarray(version.metrics.get("confusion_matrix") or [], dtype=np.int64)
    if matrix.size:
        split = str(version.metrics.get("confusion_split", "test"))
        write_confusion_matrix(matrix, version.labels, split, version.number, directory / CONFUSION_MATRIX_FILE)
