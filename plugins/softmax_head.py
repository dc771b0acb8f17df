"""Default head trainer: multinomial logistic regression (softmax) on the cached bottlenecks, fitted full-batch
with L-BFGS, L2-regularised, optionally class-weighted; the L2 strength is chosen on the validation split.

Full-batch L-BFGS beats the seed's 300 steps of SGD at batch 100: no learning rate to tune, convergence in tens
of iterations, and the whole fit is a few matrix products over data already in memory. The L2 strength is
picked on at most `_SELECTION_ROWS` training rows, then one warm-started fit runs on all of them, so a large
training set costs about one fit, not one per candidate.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from daemon.config import TrainingConfig
from daemon.dataset import Dataset, Part
from daemon.head import Head, accuracy
from daemon.hookspecs import hookimpl

_SELECTION_ROWS = 4000


def _class_weights(y: np.ndarray, classes: int, balanced: bool) -> np.ndarray:
    """Per-row weights summing to 1; balanced weighting gives every class the same total weight."""
    if not balanced:
        return np.full(len(y), 1.0 / len(y), dtype=np.float32)
    counts = np.bincount(y, minlength=classes).astype(np.float32)
    return (1.0 / (np.count_nonzero(counts) * counts[y])).astype(np.float32)


class _Objective:
    """Weighted softmax cross-entropy plus (l2/2)·|W|² over a flat parameter vector [W, b]; remembers the
    training loss and accuracy of the last point it saw, which is the point L-BFGS accepts."""

    def __init__(self, part: Part, classes: int, l2: float, balanced: bool) -> None:
        self.x, self.y, self.dim, self.classes, self.l2 = part.x, part.y, part.x.shape[1], classes, l2
        self.onehot = np.eye(classes, dtype=np.float32)[part.y]
        self.row_weights = _class_weights(part.y, classes, balanced)[:, None]
        self.last: tuple[float, float] = (0.0, 0.0)

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        split = self.dim * self.classes
        return theta[:split].reshape(self.dim, self.classes), theta[split:]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = self.unpack(theta.astype(np.float32))
        logits = self.x @ weights + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        data_loss = -float((self.row_weights * self.onehot * log_p).sum())
        self.last = (float(-np.mean(log_p[np.arange(len(self.y)), self.y])),
                     float(np.mean(logits.argmax(axis=1) == self.y)))
        delta = self.row_weights * (np.exp(log_p) - self.onehot)
        grad_w = self.x.T @ delta + self.l2 * weights
        loss = data_loss + 0.5 * self.l2 * float((weights**2).sum())
        return loss, np.concatenate([grad_w.ravel(), delta.sum(axis=0)]).astype(np.float64)


def _cross_entropy(head: Head, part: Part) -> float:
    p = head.probabilities(part.x)[np.arange(len(part.y)), part.y]
    return float(-np.mean(np.log(np.maximum(p, 1e-12))))


def _fit(train: Part, validation: Part, classes: int, l2: float, config: TrainingConfig,
         theta0: np.ndarray | None) -> tuple[Head, np.ndarray]:
    objective = _Objective(train, classes, l2, config.class_weighting)
    theta = np.zeros(objective.dim * classes + classes) if theta0 is None else theta0
    history: dict[str, list[float]] = {"train_loss": [], "train_accuracy": [], "validation_loss": [],
                                       "validation_accuracy": []}

    def record(current: np.ndarray) -> None:
        history["train_loss"].append(objective.last[0])
        history["train_accuracy"].append(objective.last[1])
        if len(validation.y):
            head = Head(*objective.unpack(current.astype(np.float32)))
            history["validation_loss"].append(_cross_entropy(head, validation))
            history["validation_accuracy"].append(float(accuracy(head, validation.x, validation.y) or 0.0))

    solution = minimize(objective, theta, jac=True, method="L-BFGS-B", callback=record,
                        options={"maxiter": config.max_iterations, "gtol": 1e-6})
    weights, bias = objective.unpack(solution.x.astype(np.float32))
    params = {"trainer": "lbfgs_softmax", "l2": l2, "iterations": int(solution.nit),
              "class_weighting": config.class_weighting, "train_rows": len(train.y)}
    return Head(weights.copy(), bias.copy(), params, history), solution.x


def _subsample(part: Part, rows: int) -> Part:
    """A fixed, evenly spread subset (the rows are in path order, so this spreads over every label)."""
    if len(part.y) <= rows:
        return part
    index = np.linspace(0, len(part.y) - 1, rows).astype(np.int64)
    return Part(part.x[index], part.y[index], ())  # only for choosing l2: no report reads its paths


def _score(head: Head, validation: Part) -> tuple[float, float]:
    if not len(validation.y):
        return (0.0, 0.0)
    return (accuracy(head, validation.x, validation.y) or 0.0, -_cross_entropy(head, validation))


@hookimpl(trylast=True)
def retraind_train_head(dataset: Dataset, config: TrainingConfig) -> Head:
    """Fit one head per L2 strength (strongest first, each warm-starting the next) and keep the best on
    validation accuracy, ties broken by validation loss; without validation images, the middle strength."""
    started = time.perf_counter()
    classes, validation = len(dataset.labels), dataset.parts["validation"]
    selection = _subsample(dataset.train, _SELECTION_ROWS)
    # Two OpenBLAS copies (numpy's, scipy's) with a thread each fight over 2 cores: one thread is 5x faster.
    with threadpool_limits(limits=1, user_api="blas"):
        candidates: list[tuple[tuple[float, float], Head, np.ndarray]] = []
        theta: np.ndarray | None = None
        for l2 in sorted(config.l2, reverse=True):
            head, theta = _fit(selection, validation, classes, l2, config, theta)
            candidates.append((_score(head, validation), head, theta))
        if len(validation.y):
            _, best, best_theta = max(candidates, key=lambda item: item[0])
        else:
            _, best, best_theta = candidates[len(candidates) // 2]
        if selection is not dataset.train:
            best, _ = _fit(dataset.train, validation, classes, best.hyperparameters["l2"], config, best_theta)
    best.hyperparameters["fit_seconds"] = round(time.perf_counter() - started, 4)
    return best
