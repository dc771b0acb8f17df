"""Trustworthy filing, per model version: calibrated scores, a review threshold derived from the precision the
user chose, and a novelty gate that sends images of untaught classes to review.

All of it is fitted on data the head did not fit. The train and validation images are dealt into `FOLDS` folds
by a hash of their path; a head is trained (through `retraind_train_head`, at the served head's L2 strength)
on all folds but one and predicts the one left out, so every image gets an out-of-fold prediction. On those:
- the calibrator (`retraind_fit_calibrator`, built in: temperature scaling, daemon/calibration.py);
- the review threshold on the calibrated top-1 score (selection with guaranteed risk, daemon/selective.py);
- the novelty threshold: known images scored out-of-fold, stand-in unknowns by leave-one-class-out
  (`retraind_fit_novelty`, built in: class-conditional Mahalanobis, daemon/novelty.py); Youden's J between
  the two, or, when `classify.novelty_false_alarm_rate` is set, the known scores' conformal quantile.

The out-of-fold predictions are kept with the version as `out_of_fold.jsonl`, one JSON object per training
or validation image: `path` (under classes/), `sha256`, `label` (its folder), `predicted` (out-of-fold
top-1), `probability` (its calibrated score), `label_probability` (the calibrated score of its folder's
label), `novelty` (its out-of-fold novelty score) and `fold`. A "suspect" is a row whose `predicted` differs
from `label` with a high `probability`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import orjson

from daemon.calibration import Calibrator, expected_calibration_error, softmax
from daemon.config import ClassifyConfig, TrainingConfig
from daemon.dataset import Dataset, Part
from daemon.engines import default_threads
from daemon.head import Head
from daemon.novelty import (
    MAX_LOCO_CLASSES,
    NoveltyScore,
    auroc,
    false_alarm_threshold,
    spread,
    youden_threshold,
)
from daemon.selective import DELTA, sgr_threshold
from daemon.split import TEST, TRAIN, VALIDATION

if TYPE_CHECKING:
    from daemon.metrics import Metrics
    from daemon.plugin_manager import Hooks
    from daemon.registry import ModelVersion

log = logging.getLogger(__name__)

FOLDS = 5
#: The most train+validation images the out-of-fold run uses (a sample by path hash, the same every run): 5
#: fold heads and the novelty fits on 50k rows took 80 s; on 10k they take a few seconds, and 10k held-out
#: predictions bound a threshold's precision within about a percentage point.
MAX_HELD_OUT = 10_000
OUT_OF_FOLD_FILE = "out_of_fold.jsonl"
LOW_CONFIDENCE, UNFAMILIAR = "low_confidence", "unfamiliar"
#: held-out groups (row indices into the pool) waiting to be scored, each with the future of its scores
_Jobs = collections.deque[tuple[np.ndarray, Future[np.ndarray]]]


@dataclass(frozen=True)
class Trust:
    """What serving needs: the calibrator, the novelty score, and the two thresholds (None: no confidence
    threshold reaches the target, so everything goes to review)."""

    calibrator: Calibrator
    novelty: NoveltyScore
    confidence_threshold: float | None
    novelty_threshold: float

    def save(self, directory: Path) -> None:
        self.calibrator.save(directory)
        self.novelty.save(directory)


@dataclass(frozen=True)
class Judgement:
    """One image's calibrated top-k, novelty score, and why it goes to review (None: it is filed)."""

    top_k: tuple[tuple[str, float], ...]
    novelty: float | None
    review_reason: str | None


def probabilities(version: ModelVersion, vectors: np.ndarray) -> np.ndarray:
    """Class probabilities (n, classes) of bottlenecks (n, dim): calibrated when the version has a calibrator."""
    logits = version.head.logits(vectors)
    return version.trust.calibrator.probabilities(logits) if version.trust else softmax(logits)


def judge(version: ModelVersion, vectors: np.ndarray, classify: ClassifyConfig) -> list[Judgement]:
    """Score bottlenecks (n, dim) and decide filing: `unfamiliar` when the novelty gate is on and the score is
    above the version's novelty threshold, else `low_confidence` when the calibrated top-1 score is below the
    threshold (`classify.confidence_threshold` when set, else the version's derived one; a threshold of 1
    reviews every image, even one whose calibrated score rounds to exactly 1)."""
    probs = probabilities(version, vectors)
    trust = version.trust
    novelty = trust.novelty.score(vectors) if trust else np.full(len(probs), np.nan)
    threshold = classify.confidence_threshold
    if threshold is None and trust is not None:
        threshold = trust.confidence_threshold
    order = np.argsort(-probs, axis=1)[:, : classify.top_k]
    judgements = []
    for row, idx, score in zip(probs, order, novelty):
        reason = None
        if classify.novelty and trust is not None and score > trust.novelty_threshold:
            reason = UNFAMILIAR
        elif threshold is None or row[idx[0]] < threshold or threshold >= 1.0:  # 1: review everything
            reason = LOW_CONFIDENCE
        top_k = tuple((version.labels[int(i)], round(float(row[i]), 6)) for i in idx)
        judgements.append(Judgement(top_k, None if np.isnan(score) else round(float(score), 4), reason))
    return judgements


# -- fitting --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FittedTrust:
    trust: Trust
    summary: dict[str, Any]  # metrics.json's "trust"
    out_of_fold: list[dict[str, Any]]

    def save(self, directory: Path) -> None:
        """Write the calibrator, the novelty score and `out_of_fold.jsonl` into a version folder (UTF-8, one
        object a line; orjson: the standard library's encoder took 0.1 s per 10k rows, before serving)."""
        self.trust.save(directory)
        (directory / OUT_OF_FOLD_FILE).write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in self.out_of_fold))


def _hash_ranks(paths: tuple[str, ...]) -> np.ndarray:
    """Each path's rank (n,) when sorted by a hash of the path: a shuffle independent of the files' order."""
    keys = [hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest() for path in paths]
    ranks = np.empty(len(paths), dtype=np.int64)
    ranks[sorted(range(len(paths)), key=keys.__getitem__)] = np.arange(len(paths))
    return ranks


def folds_of(paths: tuple[str, ...]) -> np.ndarray:
    """Fold numbers (n,): images ranked by a hash of their catalog path, dealt round-robin, so every fold is
    non-empty and the folds are a shuffle that does not depend on the order of the files."""
    return _hash_ranks(paths) % min(FOLDS, len(paths))


def _empty(part: Part) -> Part:
    return Part(part.x[:0], part.y[:0], ())


def _joined(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """`np.concatenate([first, second])` of two (n, dim) blocks, as a view where `second` follows `first` in
    one C-ordered matrix, as the splits of `build_dataset` do (10k rows: no 46 MiB copy)."""
    base = first.base
    if (isinstance(base, np.ndarray) and base is second.base and base.ndim == 2 and base.flags.c_contiguous
            and first.flags.c_contiguous and first.shape[1:] == second.shape[1:] == base.shape[1:]
            and first.ctypes.data + first.nbytes == second.ctypes.data):
        start = (first.ctypes.data - base.ctypes.data) // base.strides[0]
        return base[start : start + len(first) + len(second)]
    return np.concatenate([first, second])


def _held_out_pool(dataset: Dataset) -> Part:
    """Train and validation images, at most MAX_HELD_OUT of them (those ranked first by path hash)."""
    train, validation = dataset.parts[TRAIN], dataset.parts[VALIDATION]
    paths = train.paths + validation.paths
    if len(paths) <= MAX_HELD_OUT:
        return Part(_joined(train.x, validation.x), np.concatenate([train.y, validation.y]), paths)
    rows = np.flatnonzero(_hash_ranks(paths) < MAX_HELD_OUT)
    cut = len(train.y)
    inside, beyond = rows[rows < cut], rows[rows >= cut] - cut
    return Part(np.concatenate([train.x[inside], validation.x[beyond]]),
                np.concatenate([train.y[inside], validation.y[beyond]]), tuple(paths[i] for i in rows))


def _fold_dataset(dataset: Dataset, pool: Part, rows: np.ndarray) -> Dataset:
    """A dataset whose train split is `pool[rows]` plus the distorted variants of exactly those images."""
    part = Part(pool.x[rows], pool.y[rows], tuple(pool.paths[i] for i in rows))
    variants = dataset.variants
    if variants is not None and len(variants.y):
        sources = set(part.paths)
        keep = np.array([path in sources for path in variants.paths], dtype=bool)
        part = Part(np.concatenate([part.x, variants.x[keep]]), np.concatenate([part.y, variants.y[keep]]), ())
    return Dataset(dataset.labels, {TRAIN: part, VALIDATION: _empty(pool), TEST: _empty(pool)},
                   dataset.manifest_sha256)


def _fold_logits(dataset: Dataset, pool: Part, folds: np.ndarray, k: int, hooks: Hooks,
                 training: TrainingConfig) -> np.ndarray:
    """The logits (rows of fold k, classes) of a head trained on the pool's other folds (and their variants)."""
    fold_head = hooks.train_head(_fold_dataset(dataset, pool, np.flatnonzero(folds != k)), training)
    if fold_head is None:
        raise RuntimeError("no plugin trained a head for an out-of-fold prediction")
    return fold_head.logits(pool.x[folds == k])


def _held_out_groups(pool: Part, folds: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The novelty score's held-out groups (int64 row indices into `pool`): each fold (known images scored
    out-of-fold), and each class's images as stand-in unknowns (leave-one-class-out, at most
    MAX_LOCO_CLASSES classes, none when there is only one)."""
    fold_groups = [np.flatnonzero(folds == k) for k in np.unique(folds)]
    classes = np.unique(pool.y)
    left_out = [np.flatnonzero(pool.y == c) for c in classes[spread(len(classes), MAX_LOCO_CLASSES)]]
    return fold_groups, left_out if len(classes) > 1 else []


def _novelty_threshold(known: np.ndarray, unknown: np.ndarray, rate: float | None) -> tuple[str, float]:
    """The novelty rule's name and threshold from out-of-fold known scores (n,) and stand-in unknowns' (m,):
    leave-one-class-out Youden's J when `rate` (classify.novelty_false_alarm_rate) is None, else the conformal
    quantile that turns away at most that share of known images."""
    if rate is None:
        return "youden", youden_threshold(known, unknown)
    return "false_alarm_rate", false_alarm_threshold(known, rate)


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def workers() -> int:
    """Threads a trust fit runs its parts on: every core this process may use, at most one per fold head
    plus one for the novelty fits."""
    return min(default_threads(), FOLDS + 1)


class TrustFit:
    """The trust fit of one training run, started as soon as its dataset is built (a context manager).

    Entering it draws the held-out pool (train and validation images, at most MAX_HELD_OUT) and its folds,
    and starts the novelty fits, which need no head, on the workers while the trainer fits the head: the
    served score, then the held-out scores of each fold and of each of up to MAX_LOCO_CLASSES classes left
    out, one job per group (the built-in score: one scatter matrix, less each group's share), on one worker
    fewer than there are until the head is fitted, so the head's thread keeps a core (on 2 cores, three busy
    threads made its fit, which the fold heads wait for, 3x longer in wall time) and every other core has work.
    `finish(head, ...)` queues the `FOLDS` fold heads on the workers (through `retraind_train_head`, at the
    served head's L2 strength) ahead of the groups left, lets the groups take every worker, then fits the
    calibrator and derives the thresholds. Leaving the context waits for what is still running (the head
    was rejected, or a part failed).

    The parts run on `workers()` threads (numpy's products run without the GIL), each with BLAS pinned to
    one thread as in the head's own fit: two OpenBLAS copies (numpy's, scipy's) each running on every core
    made the covariance and head fits several times slower; one BLAS thread per part and one part per core
    do not oversubscribe. Every part is a deterministic function of its rows, so the results do not depend
    on the number of threads."""

    def __init__(self, dataset: Dataset, hooks: Hooks, threads: int | None = None) -> None:
        self.dataset, self.hooks = dataset, hooks
        self.pool = _held_out_pool(dataset)
        self.folds = folds_of(self.pool.paths) if len(self.pool.y) else np.zeros(0, dtype=np.int64)
        self._threads = threads or workers()
        self._stack = contextlib.ExitStack()
        self._novelty: Future[tuple[NoveltyScore, list[Future[np.ndarray]]]] | None = None
        self._lanes_lock = threading.Lock()
        self._lanes: tuple[Callable[[np.ndarray], np.ndarray], _Jobs] | None = None
        self._lanes_running, self._head_fitted = 0, False
        self.started = 0.0

    def __enter__(self) -> Self:
        import scipy.linalg  # noqa: F401 - loaded before the limit: a BLAS first loaded inside it is not limited
        from threadpoolctl import threadpool_limits

        self._stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        self._executor = self._stack.enter_context(ThreadPoolExecutor(self._threads, "retraind-trust"))
        self.started = time.perf_counter()
        if len(self.pool.y) >= 2:
            self._novelty = self._executor.submit(self._fit_novelty)
        return self

    def __exit__(self, *exc: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._stack.close()

    def _fit_novelty(self) -> tuple[NoveltyScore, list[Future[np.ndarray]]]:
        """The served score; then the held-out groups' scores, one job per group, on `threads` − 1 lanes
        while the served head is fitted (its thread keeps a core: three busy threads on two cores starved the
        head, which the fold heads wait for), on `threads` lanes once it is."""
        novelty = self.hooks.fit_novelty(self.pool.x, self.pool.y)
        scorer = self.hooks.held_out_scorer(novelty, self.pool.x, self.pool.y)
        known, unknown = _held_out_groups(self.pool, self.folds)
        jobs: _Jobs = collections.deque((group, Future()) for group in known + unknown)
        scores = [future for _, future in jobs]
        with self._lanes_lock:
            self._lanes = scorer, jobs
        self._open_lanes()
        return novelty, scores

    def _open_lanes(self) -> None:
        """Start held-out scoring lanes up to the number allowed now (see `_fit_novelty`)."""
        with self._lanes_lock:
            if self._lanes is None:
                return
            allowed = self._threads if self._head_fitted else max(1, self._threads - 1)
            opened, self._lanes_running = allowed - self._lanes_running, max(allowed, self._lanes_running)
        for _ in range(opened):
            self._executor.submit(self._score_next, *self._lanes)

    def head_fitted(self) -> None:
        """The served head is fitted (or the run ends without it): the novelty scoring may take every
        worker. Called by `out_of_fold` after it queues the fold heads, which therefore run first."""
        with self._lanes_lock:
            self._head_fitted = True
        self._open_lanes()

    def _score_next(self, scorer: Callable[[np.ndarray], np.ndarray], jobs: _Jobs) -> None:
        """Score the next held-out group, then queue this lane again behind what was submitted meanwhile: the
        fold heads, queued once the served head is fitted, run first (the calibrator waits for all of them),
        and the groups left fill the cores while the last fold heads and the calibrator run."""
        try:
            group, future = jobs.popleft()
        except IndexError:
            return
        try:
            future.set_result(scorer(group))
        except Exception as error:  # noqa: BLE001 - raised again to the trainer by `novelty()`; the lane goes on
            future.set_exception(error)
        self._executor.submit(self._score_next, scorer, jobs)

    def novelty(self) -> tuple[NoveltyScore, np.ndarray, np.ndarray]:
        """The served novelty score, the pool's out-of-fold scores (n,) and the stand-in unknowns' scores."""
        if self._novelty is None:
            raise ValueError("calibration needs at least 2 train or validation images")
        novelty, scores = self._novelty.result()
        fold_groups = _held_out_groups(self.pool, self.folds)[0]
        known = np.zeros(len(self.pool.y), dtype=np.float32)
        for group, fold_scores in zip(fold_groups, scores):
            known[group] = fold_scores.result()
        unknown = [group_scores.result() for group_scores in scores[len(fold_groups):]]
        return novelty, known, np.concatenate(unknown) if unknown else np.empty(0, dtype=np.float32)

    def out_of_fold(self, head: Head, training: TrainingConfig) -> np.ndarray:
        """Out-of-fold logits (n, classes) for every row of the pool, the fold heads trained on the workers."""
        if "l2" in head.hyperparameters:  # the served head's strength: one fit per fold, not one per candidate
            training = dataclasses.replace(training, l2=[float(head.hyperparameters["l2"])])
        pool, folds = self.pool, self.folds
        fits = {int(k): self._executor.submit(_fold_logits, self.dataset, pool, folds, int(k), self.hooks,
                                              training) for k in np.unique(folds)}
        logits = np.zeros((len(pool.y), len(self.dataset.labels)), dtype=np.float32)
        self.head_fitted()
        for k, fit in fits.items():
            logits[folds == k] = fit.result()
        return logits

    def finish(self, head: Head, training: TrainingConfig, classify: ClassifyConfig,
               sha256_of: Mapping[str, str | None]) -> FittedTrust:
        """Calibrate `head`, derive its review and novelty thresholds, and describe them for `metrics.json`.
        Raises ValueError when the train and validation splits hold fewer than 2 images."""
        return _fit_trust(head, self, training, classify, sha256_of)


def fit_trust(head: Head, dataset: Dataset, hooks: Hooks, training: TrainingConfig, classify: ClassifyConfig,
              sha256_of: Mapping[str, str | None], threads: int | None = None) -> FittedTrust:
    """`TrustFit(dataset, hooks, threads)`, finished at once for a head already fitted."""
    with TrustFit(dataset, hooks, threads) as started:
        return started.finish(head, training, classify, sha256_of)


def _fit_trust(head: Head, parts: TrustFit, training: TrainingConfig, classify: ClassifyConfig,
               sha256_of: Mapping[str, str | None]) -> FittedTrust:
    finishing = time.perf_counter()
    dataset, hooks, pool, folds = parts.dataset, parts.hooks, parts.pool, parts.folds
    if len(pool.y) < 2:
        raise ValueError("calibration needs at least 2 train or validation images")
    oof_logits = parts.out_of_fold(head, training)
    calibrator = hooks.fit_calibrator(oof_logits, pool.y)
    calibrated = calibrator.probabilities(oof_logits)
    predicted, confidence = calibrated.argmax(axis=1), calibrated.max(axis=1)
    novelty, known, unknown = parts.novelty()
    novelty_rule, novelty_threshold = _novelty_threshold(known, unknown, classify.novelty_false_alarm_rate)
    selected = sgr_threshold(confidence, predicted == pool.y, classify.target_precision)
    trust = Trust(calibrator, novelty, None if selected is None else selected.threshold, novelty_threshold)
    filed = (confidence >= (np.inf if selected is None else selected.threshold)) & (known <= novelty_threshold)
    test = dataset.parts[TEST]
    test_logits = head.logits(test.x)
    summary = {
        "target_precision": classify.target_precision, "delta": DELTA,
        "confidence_threshold": trust.confidence_threshold,  # unrounded: serving reads it back
        "expected_coverage": _rounded(float(filed.mean())),
        "expected_precision": _rounded(float(np.mean(predicted[filed] == pool.y[filed])) if filed.any() else None),
        "precision_bound": _rounded(None if selected is None else selected.precision_bound),
        "reason": None if selected is not None else _unreachable(classify.target_precision, pool, predicted),
        "calibration": {
            "method": calibrator.name, "parameters": calibrator.parameters, "bins": 10,
            "out_of_fold": {"before": _rounded(expected_calibration_error(softmax(oof_logits), pool.y)),
                            "after": _rounded(expected_calibration_error(calibrated, pool.y))},
            TEST: {"before": _rounded(expected_calibration_error(softmax(test_logits), test.y)),
                   "after": _rounded(expected_calibration_error(calibrator.probabilities(test_logits), test.y))},
        },
        "novelty": {"method": trust.novelty.name, "threshold": novelty_threshold, "rule": novelty_rule,
                    "false_alarm_rate": classify.novelty_false_alarm_rate,
                    "known_flagged": _rounded(float(np.mean(known > novelty_threshold))),
                    "stand_in_unknowns_kept": _rounded(float(np.mean(unknown <= novelty_threshold))
                                                       if len(unknown) else None),
                    "loco_auroc": _rounded(auroc(known, unknown))},
        "out_of_fold": {"folds": len(np.unique(folds)), "images": len(pool.y),
                        "accuracy": _rounded(float(np.mean(predicted == pool.y))), "file": OUT_OF_FOLD_FILE},
        # wall seconds the trust fit added after the head's fit, and since it started (beside the head's fit)
        "fit_seconds": round(time.perf_counter() - finishing, 4),
        "started_seconds": round(time.perf_counter() - parts.started, 4),
    }
    rows = _out_of_fold_rows(dataset.labels, pool, sha256_of, predicted, confidence, calibrated, known, folds)
    return FittedTrust(trust, summary, rows)


def _out_of_fold_rows(labels: tuple[str, ...], pool: Part, sha256_of: Mapping[str, str | None],
                      predicted: np.ndarray, confidence: np.ndarray, calibrated: np.ndarray, known: np.ndarray,
                      folds: np.ndarray) -> list[dict[str, Any]]:
    """`out_of_fold.jsonl`'s rows, one per pool image; the columns turned into Python lists once (10k rows:
    0.06 s through one numpy scalar per cell)."""
    y = pool.y.tolist()
    label_probability = calibrated[np.arange(len(y)), pool.y].tolist()
    columns = zip(pool.paths, y, predicted.tolist(), confidence.tolist(), label_probability,
                  known.tolist(), folds.tolist())
    return [{"path": path, "sha256": sha256_of.get(path), "label": labels[label], "predicted": labels[guess],
             "probability": round(probability, 6), "label_probability": round(own, 6), "novelty": round(novelty, 4),
             "fold": fold} for path, label, guess, probability, own, novelty, fold in columns]


def _unreachable(target: float, pool: Part, predicted: np.ndarray) -> str:
    return (f"no review threshold reaches precision {target:.0%} (with {1 - DELTA:.0%} confidence) on "
            f"{len(pool.y)} held-out predictions (out-of-fold accuracy {np.mean(predicted == pool.y):.1%}); "
            "every image goes to review until more images are taught or classify.confidence_threshold is set")


def load_trust(version: ModelVersion, hooks: Hooks) -> Trust | None:
    """The version's calibrator and novelty score from its folder; None for a version made before them."""
    summary = version.metrics.get("trust")
    if not summary:
        return None
    calibrator = hooks.load_calibrator(summary["calibration"]["method"], version.directory)
    novelty = hooks.load_novelty(summary["novelty"]["method"], version.directory)
    return Trust(calibrator, novelty, summary["confidence_threshold"], float(summary["novelty"]["threshold"]))


def show(metrics: Metrics, version: ModelVersion) -> None:
    """Set the per-version trust gauges from the version's `metrics.json`."""
    summary = version.metrics.get("trust") or {}
    metrics.calibration_error.clear()
    for split, pair in (summary.get("calibration") or {}).items():
        if isinstance(pair, dict) and "before" in pair:
            for scores, key in (("raw", "before"), ("calibrated", "after")):
                if pair[key] is not None:
                    metrics.calibration_error.labels(split=split, scores=scores).set(pair[key])
    metrics.target_precision.set(summary.get("target_precision") or 0)
    metrics.expected_coverage.set(summary.get("expected_coverage") or 0)
    metrics.review_threshold.clear()
    if summary.get("confidence_threshold") is not None:
        metrics.review_threshold.labels(score="confidence").set(summary["confidence_threshold"])
    if summary.get("novelty"):
        metrics.review_threshold.labels(score="novelty").set(summary["novelty"]["threshold"])
    metrics.filing_suspended.set(1 if summary.get("reason") or not summary else 0)
