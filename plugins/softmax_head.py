"""Default head trainer: multinomial logistic regression (softmax) on the cached bottlenecks, fitted full-batch
with L-BFGS, L2-regularised, optionally class-weighted; the L2 strength is chosen on the validation split.

Full-batch L-BFGS beats the seed's 300 steps of SGD at batch 100: no learning rate to tune, convergence in tens
of iterations, and the whole fit is a few matrix products over data already in memory. The L2 strength is
picked on at most `_SELECTION_ROWS` training rows, then one warm-started fit runs on all of them, so a large
training set costs about one fit, not one per candidate.

`training.optimizer: sgd` or `adam` swaps each fit for retrain.py's loop instead: `how_many_training_steps`
steps on random batches of `train_batch_size` rows at `learning_rate`, evaluated every `eval_step_interval`
steps on the batch and on `validation_batch_size` validation rows (-1: all).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from daemon.config import TrainingConfig
from daemon.dataset import Dataset, Part
from daemon.head import Head, accuracy
from daemon.hookspecs import hookimpl

_SELECTION_ROWS = 1000


def _class_weights(y: np.ndarray, classes: int, balanced: bool) -> np.ndarray:
    """Per-row weights summing to 1; balanced weighting gives every class the same total weight."""
    if not balanced:
        return np.full(len(y), 1.0 / len(y), dtype=np.float32)
    counts = np.bincount(y, minlength=classes).astype(np.float32)
    return np.asarray(1.0 / (np.count_nonzero(counts) * counts[y]), dtype=np.float32)


#: Rows per block of the objective: each block's rows are read from memory once for the forward and the
#: gradient products (a 2.6 MiB block is still in cache for the second), ~18 % less time per evaluation.
_BLOCK_ROWS = 512


class _Objective:
    """Weighted softmax cross-entropy plus (l2/2)·|W|² over a flat parameter vector [W, b]; remembers the
    training loss and accuracy of the last point it saw, which is the point L-BFGS accepts."""

    def __init__(self, part: Part, classes: int, l2: float, balanced: bool) -> None:
        self.x, self.y, self.dim, self.classes, self.l2 = part.x, part.y, part.x.shape[1], classes, l2
        self.row_weights = _class_weights(part.y, classes, balanced)
        self.last: tuple[float, float] = (0.0, 0.0)

    def rows(self, index: np.ndarray) -> _Objective:
        """The same objective on a mini-batch, its row weights renormalised to sum to 1."""
        batch = copy.copy(self)
        batch.x, batch.y = self.x[index], self.y[index]
        batch.row_weights = self.row_weights[index] / self.row_weights[index].sum()
        return batch

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        split = self.dim * self.classes
        return theta[:split].reshape(self.dim, self.classes), theta[split:]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = self.unpack(theta.astype(np.float32))
        grad_w, grad_b = self.l2 * weights, np.zeros(self.classes, dtype=np.float32)
        data_loss = label_loss = 0.0
        correct = 0
        for start in range(0, len(self.y), _BLOCK_ROWS):
            rows = slice(start, start + _BLOCK_ROWS)
            x, y, row_weights = self.x[rows], self.y[rows], self.row_weights[rows]
            logits = x @ weights + bias
            logits -= logits.max(axis=1, keepdims=True)
            log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            label_log_p = log_p[np.arange(len(y)), y]
            data_loss -= float(row_weights @ label_log_p)
            label_loss -= float(label_log_p.sum())
            correct += int(np.count_nonzero(logits.argmax(axis=1) == y))
            delta = row_weights[:, None] * np.exp(log_p)  # softmax less the one-hot label, weighted
            delta[np.arange(len(y)), y] -= row_weights
            grad_w += x.T @ delta
            grad_b += delta.sum(axis=0)
        self.last = (label_loss / len(self.y), correct / len(self.y))
        loss = data_loss + 0.5 * self.l2 * float((weights**2).sum())
        return loss, np.concatenate([grad_w.ravel(), grad_b]).astype(np.float64)


def _log_loss(probabilities: np.ndarray, y: np.ndarray) -> float:
    p = probabilities[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.maximum(p, 1e-12))))


def _cross_entropy(head: Head, part: Part) -> float:
    return _log_loss(head.probabilities(part.x), part.y)


def _fit(train: Part, validation: Part, classes: int, l2: float, config: TrainingConfig,
         theta0: np.ndarray | None) -> tuple[Head, np.ndarray]:
    objective = _Objective(train, classes, l2, config.class_weighting)
    theta = np.zeros(objective.dim * classes + classes) if theta0 is None else theta0
    history: dict[str, list[float]] = {"train_loss": [], "train_accuracy": [], "validation_loss": [],
                                       "validation_accuracy": []}

    def record(current: np.ndarray) -> None:
        history["train_loss"].append(objective.last[0])
        history["train_accuracy"].append(objective.last[1])
        if len(validation.y):  # one pass over the validation rows per point for both curves
            probabilities = Head(*objective.unpack(current.astype(np.float32))).probabilities(validation.x)
            history["validation_loss"].append(_log_loss(probabilities, validation.y))
            history["validation_accuracy"].append(float(np.mean(probabilities.argmax(axis=1) == validation.y)))

    from scipy.optimize import minimize  # at the first fit: serving never needs SciPy

    solution = minimize(objective, theta, jac=True, method="L-BFGS-B", callback=record,
                        options={"maxiter": config.max_iterations, "gtol": 1e-6})
    weights, bias = objective.unpack(solution.x.astype(np.float32))
    params = {"trainer": "lbfgs_softmax", "l2": l2, "iterations": int(solution.nit),
              "class_weighting": config.class_weighting, "train_rows": len(train.y)}
    return Head(weights.copy(), bias.copy(), params, history), solution.x


def _step_rule(config: TrainingConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Parameter change per gradient: plain SGD (the seed's optimizer), or Adam with its usual constants."""
    rate = config.learning_rate
    if config.optimizer == "sgd":
        return lambda grad: rate * grad
    moments: dict[str, Any] = {"m": 0.0, "v": 0.0, "t": 0}

    def adam(grad: np.ndarray) -> np.ndarray:
        moments["t"] += 1
        moments["m"] = 0.9 * moments["m"] + 0.1 * grad
        moments["v"] = 0.999 * moments["v"] + 0.001 * grad**2
        m_hat, v_hat = moments["m"] / (1 - 0.9 ** moments["t"]), moments["v"] / (1 - 0.999 ** moments["t"])
        return rate * m_hat / (np.sqrt(v_hat) + 1e-8)  # type: ignore[no-any-return]

    return adam


def _fit_minibatch(train: Part, validation: Part, classes: int, l2: float, config: TrainingConfig,
                   theta0: np.ndarray | None) -> tuple[Head, np.ndarray]:
    """retrain.py's training loop on the cached bottlenecks, batches drawn with replacement as it did."""
    objective = _Objective(train, classes, l2, config.class_weighting)
    rng, step_rule = np.random.default_rng(0), _step_rule(config)
    theta = np.zeros(objective.dim * classes + classes) if theta0 is None else theta0.copy()
    history: dict[str, list[float]] = {key: [] for key in (
        "step", "train_loss", "train_accuracy", "validation_loss", "validation_accuracy")}
    steps = config.how_many_training_steps
    for step in range(steps):
        batch = objective.rows(rng.integers(0, len(train.y), config.train_batch_size))
        _, grad = batch(theta)
        if step % config.eval_step_interval == 0 or step + 1 == steps:
            history["step"].append(step)
            history["train_loss"].append(batch.last[0])
            history["train_accuracy"].append(batch.last[1])
            if len(validation.y):
                size = len(validation.y) if config.validation_batch_size < 0 else config.validation_batch_size
                sample = _subsample(validation, size) if size < len(validation.y) else validation
                head = Head(*objective.unpack(theta.astype(np.float32)))
                history["validation_loss"].append(_cross_entropy(head, sample))
                history["validation_accuracy"].append(float(accuracy(head, sample.x, sample.y) or 0.0))
        theta = theta - step_rule(grad)
    weights, bias = objective.unpack(theta.astype(np.float32))
    params = {"trainer": f"minibatch_{config.optimizer}", "l2": l2, "steps": steps,
              "learning_rate": config.learning_rate, "train_batch_size": config.train_batch_size,
              "class_weighting": config.class_weighting, "train_rows": len(train.y)}
    return Head(weights.copy(), bias.copy(), params, history), theta


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


def _with_path(fits: list[Head]) -> Head:
    """The last fit with the curves of every fit that led to it (each warm-starts the next), so its training
    curve starts from zero weights, not from an already fitted head; `l2` gives each point's strength."""
    last = fits[-1]
    history: dict[str, list[float]] = {key: [value for head in fits for value in head.history.get(key, [])] for key in last.history}
    history["l2"] = [head.hyperparameters["l2"] for head in fits for _ in head.history.get("train_loss", [])]
    if "step" in history:  # mini-batch fits count steps from 0 each; the path counts on
        history["step"], offset = [], 0
        for head in fits:
            history["step"] += [offset + step for step in head.history["step"]]
            offset = int(history["step"][-1]) + 1 if history["step"] else offset
    return Head(last.weights, last.bias, last.hyperparameters, history)


@hookimpl
def retraind_on_training_pending() -> None:
    import scipy.optimize  # noqa: F401 - a fresh process's first import: in the quiet period, not on the first run's path


@hookimpl(trylast=True)
def retraind_train_head(dataset: Dataset, config: TrainingConfig) -> Head:
    """Fit one head per L2 strength (strongest first, each warm-starting the next) and keep the best on
    validation accuracy, ties broken by validation loss; without validation images, the middle strength."""
    # SciPy is loaded before the limit: its own OpenBLAS, first loaded inside it, would run on every core (the
    # first fit of a process took 14x longer)
    import scipy.optimize  # noqa: F401
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    classes, validation = len(dataset.labels), dataset.parts["validation"]
    fit = _fit if config.optimizer == "lbfgs" else _fit_minibatch
    selection = _subsample(dataset.training_rows, _SELECTION_ROWS)
    # Two OpenBLAS copies (numpy's, scipy's) with a thread each fight over 2 cores: one thread is 5x faster.
    with threadpool_limits(limits=1, user_api="blas"):
        candidates: list[tuple[tuple[float, float], Head, np.ndarray]] = []
        theta: np.ndarray | None = None
        for l2 in sorted(config.l2, reverse=True):
            head, theta = fit(selection, validation, classes, l2, config, theta)
            candidates.append((_score(head, validation), head, theta))
        chosen = (max(range(len(candidates)), key=lambda i: candidates[i][0]) if len(validation.y)
                  else len(candidates) // 2)
        _, best, best_theta = candidates[chosen]
        path = [head for _, head, _ in candidates[: chosen + 1]]
        if selection is not dataset.training_rows:
            l2 = best.hyperparameters["l2"]
            best, _ = fit(dataset.training_rows, validation, classes, l2, config, best_theta)
            path.append(best)
        best = _with_path(path)
    best.hyperparameters["fit_seconds"] = round(time.perf_counter() - started, 4)
    return best
