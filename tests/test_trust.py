"""Calibration, the SGR review threshold and the novelty score, on data whose answer is known; and the hooks
that let a plugin replace the calibrator and the novelty score."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.calibration import TemperatureScaling, expected_calibration_error, softmax
from daemon.config import ClassifyConfig, ConfigError, SplitConfig, TrainingConfig, parse_config
from daemon.dataset import Dataset, Part, build_dataset
from daemon.hookspecs import hookimpl
from daemon.novelty import SHRINKAGE, ClassMahalanobis, auroc, false_alarm_threshold, youden_threshold
from daemon.plugin_manager import Hooks, make_plugin_manager
from daemon.registry import ModelVersion
from daemon.selective import risk_upper_bound, sgr_threshold
from daemon.store import CatalogEntry
from daemon.trust import UNFAMILIAR, TrustFit, fit_trust, judge

RNG = np.random.default_rng(0)


def test_expected_calibration_error_by_hand() -> None:
    # bin 0.6-0.7: scores 0.65, 0.65, both right -> |1 - 0.65| = 0.35 over half the rows; bin 0.9-1.0: 0.95
    # and 0.95, one right -> |0.5 - 0.95| = 0.45 over the other half
    p = np.array([[0.65, 0.35], [0.35, 0.65], [0.95, 0.05], [0.05, 0.95]])
    assert expected_calibration_error(p, np.array([0, 1, 0, 0])) == pytest.approx(0.5 * 0.35 + 0.5 * 0.45)
    assert expected_calibration_error(p[:0], np.array([], dtype=np.int64)) is None


def test_temperature_scaling_recovers_the_temperature_that_made_the_labels() -> None:
    logits = RNG.normal(0, 3, (4000, 5))
    truth = softmax(logits / 2.0)
    y = np.array([RNG.choice(5, p=row) for row in truth])
    fitted = TemperatureScaling.fit(logits, y)
    assert fitted.temperature == pytest.approx(2.0, rel=0.1)
    assert expected_calibration_error(fitted.probabilities(logits), y) < expected_calibration_error(softmax(logits), y)
    assert (fitted.probabilities(logits).argmax(axis=1) == logits.argmax(axis=1)).all()  # accuracy untouched


def test_temperature_floor_keeps_perfect_predictions_below_certainty() -> None:
    logits = np.array([[30.0, 0.0], [0.0, 30.0]] * 20)
    fitted = TemperatureScaling.fit(logits, np.array([0, 1] * 20))
    assert fitted.temperature == TemperatureScaling.LOWEST


def test_clopper_pearson_bound() -> None:
    assert risk_upper_bound(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))
    assert risk_upper_bound(10, 10, 0.05) == 1.0


def test_sgr_threshold_keeps_its_precision_on_fresh_images() -> None:
    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        scores = RNG.uniform(0.3, 1.0, n)
        return scores, RNG.uniform(0, 1, n) < scores  # a calibrated score: right with that probability

    found = sgr_threshold(*draw(3000), target_precision=0.9)
    assert found is not None and found.precision_bound >= 0.9 and 0.1 < found.coverage < 0.6
    fresh, right = draw(100_000)
    assert right[fresh >= found.threshold].mean() >= 0.9
    assert sgr_threshold(np.ones(20), np.ones(20, dtype=bool), 0.9) is None  # 20 perfect images prove too little
    assert sgr_threshold(np.ones(60), np.ones(60, dtype=bool), 0.9) is not None


def test_a_small_perfect_record_that_proves_the_target_files_everything() -> None:
    """KIND: a small, clean training set whose out-of-fold record proves the target precision when every image
    is filed was sent to review whole: SGR's first probe files half of the images, and half a perfect record
    proves less than all of it. INPUT: 67 held-out images, every top-1 right, distinct scores (QA-6 saw
    67 of 67 file nothing)."""
    scores = np.linspace(0.99, 0.4, 67)
    found = sgr_threshold(scores, np.ones(67, dtype=bool), 0.9)
    assert found is not None and found.coverage == 1.0 and found.threshold == pytest.approx(0.4)
    assert found.precision_bound >= 0.9
    assert sgr_threshold(scores[:30], np.ones(30, dtype=bool), 0.9) is None  # 30 right of 30 prove too little
    right = np.ones(67, dtype=bool)
    right[-1] = False  # one wrong still proves 90 % filing all 67
    assert (found := sgr_threshold(scores, right, 0.9)) is not None and found.coverage == 1.0
    right[-6:] = False  # six wrong do not, and no smaller set of these few images proves it either
    assert sgr_threshold(scores, right, 0.9) is None


def test_mahalanobis_finds_the_unknown_cluster_and_round_trips(tmp_path: Path) -> None:
    means = RNG.normal(0, 4, (3, 20))
    y = np.repeat(np.arange(3), 100)
    x = (means[y] + RNG.normal(0, 1, (300, 20))).astype(np.float32)
    unknown = (RNG.normal(0, 4, 20) + RNG.normal(0, 1, (50, 20))).astype(np.float32)
    score = ClassMahalanobis.fit(x[::2], y[::2])
    held_out = score.score(x[1::2])
    assert (auroc(held_out, score.score(unknown)) or 0) > 0.95
    score.save(tmp_path)
    assert np.allclose(ClassMahalanobis.load(tmp_path).score(unknown), score.score(unknown))


def _by_hand(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """min_c (x − μ_c)ᵀ Σ⁻¹ (x − μ_c) of `rows`, Σ the shrunk tied covariance of the other rows (float64)."""
    keep = np.ones(len(y), dtype=bool)
    keep[rows] = False
    fit_x, fit_y = x[keep].astype(np.float64), y[keep]
    means = np.stack([fit_x[fit_y == c].mean(axis=0) for c in np.unique(fit_y)])
    centred = fit_x - means[np.searchsorted(np.unique(fit_y), fit_y)]
    covariance = centred.T @ centred / len(fit_y)
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    inverse = np.linalg.inv(covariance)
    diffs = x[rows, None, :].astype(np.float64) - means[None, :, :]
    return np.einsum("ncd,de,nce->nc", diffs, inverse, diffs).min(axis=1)  # type: ignore[no-any-return]


def test_held_out_novelty_scores_are_those_of_a_fit_without_the_rows() -> None:
    """One scatter matrix less each group's share gives what a fit on the other rows gives (K folds, classes
    left out), and the fitted score is the Mahalanobis distance computed by hand."""
    means = RNG.gamma(2.0, 0.5, (4, 30))
    y = np.repeat(np.arange(4), 60)
    x = np.abs(means[y] + RNG.normal(0, 0.8, (240, 30))).astype(np.float32)
    folds = np.arange(240) % 5
    groups = [np.flatnonzero(folds == k) for k in range(5)] + [np.flatnonzero(y == c) for c in range(4)]
    scorer = ClassMahalanobis.fit(x, y).held_out_scorer(x, y)
    for group in groups:
        scores = scorer(group)
        assert scores.shape == (len(group),)
        assert np.allclose(scores, _by_hand(x, y, group), rtol=1e-4)
    assert np.allclose(ClassMahalanobis.fit(x, y).score(x[:20]), _by_hand(np.vstack([x, x[:20]]), np.r_[y, y[:20]],
                                                                            np.arange(240, 260)), rtol=1e-4)


def test_auroc_and_youden_by_hand() -> None:
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1.0
    assert auroc(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 0.5
    assert auroc(np.array([1.0, 2.0]), np.array([2.0])) == 0.75  # a tie counts half
    assert youden_threshold(np.array([1.0, 2.0, 3.0, 6.0]), np.array([3.5, 4.0, 5.0])) == 3.0  # J = 3/4 - 0


def test_false_alarm_threshold_is_the_conformal_quantile() -> None:
    known = np.arange(1.0, 20.0)  # 19 scores
    assert false_alarm_threshold(known, 0.1) == 18.0  # the ⌈20 × 0.9⌉ = 18th smallest
    assert false_alarm_threshold(known, 0.05) == 19.0 == false_alarm_threshold(known, 0.0)  # too few to turn any away
    assert false_alarm_threshold(known, 0.5) == 10.0
    # The conformal guarantee is on average over calibration sets (Vovk et al. 2005): with 400 known scores
    # drawn from N(0, 1) 200 times, the mean share of new known images turned away, 1 − Φ(threshold), is the
    # chosen rate (sd ≈ 0.0014 here). One set alone misses it by ±0.02, so a single draw would hold or fail
    # by the seed (its own generator: no other test's draws move it).
    draws = np.random.default_rng(7).normal(size=(200, 400))
    for rate in (0.05, 0.2):
        turned_away = [0.5 * math.erfc(false_alarm_threshold(scores, rate) / math.sqrt(2)) for scores in draws]
        assert abs(np.mean(turned_away) - rate) < 0.006
    with pytest.raises(ValueError, match="at least one"):
        false_alarm_threshold(np.empty(0), 0.1)


def test_novelty_false_alarm_rate_sets_the_threshold_and_who_is_flagged(tmp_path: Path) -> None:
    dataset, hooks = _dataset(), Hooks(make_plugin_manager())
    head = hooks.train_head(dataset, TrainingConfig())
    assert head is not None
    fresh = _dataset().parts["train"].x  # new images of the known classes
    flagged = {}
    for rate in (None, 0.02, 0.4):
        classify = ClassifyConfig(novelty_false_alarm_rate=rate)
        fitted = fit_trust(head, dataset, hooks, TrainingConfig(), classify, {})
        novelty = fitted.summary["novelty"]
        oof = np.array([row["novelty"] for row in fitted.out_of_fold])
        assert (novelty["rule"], novelty["false_alarm_rate"]) == ("youden" if rate is None else "false_alarm_rate", rate)
        if rate is not None:
            assert novelty["threshold"] == pytest.approx(false_alarm_threshold(oof, rate), rel=1e-4)
            assert novelty["known_flagged"] <= rate
        version = ModelVersion(1, tmp_path, dataset.labels, "tiny", head, {}, fitted.trust)
        flagged[rate] = {i for i, j in enumerate(judge(version, fresh, classify)) if j.review_reason == UNFAMILIAR}
    assert flagged[0.02] < flagged[0.4] and len(flagged[0.4]) > 0.2 * len(fresh)  # a higher rate flags more


def test_confidence_threshold_null_means_not_set() -> None:
    assert parse_config({"classify": {"confidence_threshold": None}}, Path("/tmp")).classify.confidence_threshold is None
    assert parse_config({"classify": {"confidence_threshold": 0.7}}, Path("/tmp")).classify.confidence_threshold == 0.7
    with pytest.raises(ConfigError, match=r"classify.confidence_threshold: expected float, got str"):
        parse_config({"classify": {"confidence_threshold": "high"}}, Path("/tmp"))
    with pytest.raises(ConfigError, match=r"classify.target_precision: 1.5 is out of range"):
        parse_config({"classify": {"target_precision": 1.5}}, Path("/tmp"))


def test_novelty_false_alarm_rate_config() -> None:
    assert parse_config({}, Path("/tmp")).classify.novelty_false_alarm_rate is None  # Youden's J
    assert parse_config({"classify": {"novelty_false_alarm_rate": 0.05}}, Path("/tmp")).classify == ClassifyConfig(
        novelty_false_alarm_rate=0.05)
    with pytest.raises(ConfigError, match=r"classify.novelty_false_alarm_rate: 0.7 is out of range \[0, 0.5\]"):
        parse_config({"classify": {"novelty_false_alarm_rate": 0.7}}, Path("/tmp"))
    with pytest.raises(ConfigError, match=r"classify.novelty_false_alarm_rate: expected float, got str"):
        parse_config({"classify": {"novelty_false_alarm_rate": "5%"}}, Path("/tmp"))


class _Constant:
    """A calibrator and a novelty score that a plugin contributes in place of the built-ins."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parameters: dict[str, Any] = {}

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(len(x), dtype=np.float32)

    def save(self, directory: Path) -> None:
        (directory / self.name).write_text("")


class _Replacing:
    @hookimpl
    def retraind_fit_calibrator(self, logits: np.ndarray, labels: np.ndarray) -> _Constant:
        return _Constant("identity")

    @hookimpl
    def retraind_fit_novelty(self, x: np.ndarray, labels: np.ndarray) -> _Constant:
        return _Constant("never_novel")


def _dataset() -> Dataset:
    y = np.repeat(np.arange(2), 60)
    x = (np.array([[3.0, 0.0], [0.0, 3.0]])[y] + RNG.normal(0, 1, (120, 2))).astype(np.float32)
    paths = tuple(f"{'ab'[label]}/{i}.jpg" for i, label in enumerate(y))
    empty = Part(x[:0], y[:0], ())
    return Dataset(("a", "b"), {"train": Part(x, y, paths), "validation": empty, "test": empty}, "manifest")


def test_a_plugin_replaces_the_calibrator_and_the_novelty_score(tmp_path: Path) -> None:
    dataset = _dataset()
    for extra, (calibrator, novelty) in (((), ("temperature", "class_mahalanobis")),
                                         ((_Replacing(),), ("identity", "never_novel"))):
        hooks = Hooks(make_plugin_manager(extra=extra))
        head = hooks.train_head(dataset, TrainingConfig())
        assert head is not None
        fitted = fit_trust(head, dataset, hooks, TrainingConfig(), ClassifyConfig(), {})
        assert (fitted.summary["calibration"]["method"], fitted.summary["novelty"]["method"]) == (calibrator, novelty)
        assert len(fitted.out_of_fold) == 120 and fitted.summary["out_of_fold"]["folds"] == 5
        # held-out scores come from the plugin's own score (the built-in's shortcut answers only for its own)
        assert all(row["novelty"] == 0.0 for row in fitted.out_of_fold) == (novelty == "never_novel")
        fitted.save(tmp_path)
        assert (tmp_path / "out_of_fold.jsonl").read_text().count("\n") == 120


def test_the_trust_fit_gives_the_same_result_on_any_number_of_threads() -> None:
    """The fold heads and the novelty fits run on worker threads beside each other; each fold's logits land on
    that fold's rows, so one thread and six give the same thresholds and out-of-fold rows."""
    y = np.repeat(np.arange(3), 50)
    x = (RNG.gamma(2.0, 0.5, (3, 8))[y] + RNG.normal(0, 0.6, (150, 8))).astype(np.float32)
    paths = tuple(f"{'abc'[label]}/{i}.jpg" for i, label in enumerate(y))
    empty = Part(x[:0], y[:0], ())
    dataset = Dataset(("a", "b", "c"), {"train": Part(x, y, paths), "validation": empty, "test": empty}, "m")
    hooks = Hooks(make_plugin_manager())
    head = hooks.train_head(dataset, TrainingConfig())
    assert head is not None
    one, six = (fit_trust(head, dataset, hooks, TrainingConfig(), ClassifyConfig(), {}, threads=n) for n in (1, 6))
    assert one.out_of_fold == six.out_of_fold and 0.5 < one.summary["out_of_fold"]["accuracy"] < 1.0
    seconds = ("fit_seconds", "started_seconds")
    assert ({k: v for k, v in one.summary.items() if k not in seconds}
            == {k: v for k, v in six.summary.items() if k not in seconds})


def test_the_held_out_pool_is_a_view_of_the_training_matrix() -> None:
    """Train and validation rows lie next to each other in the matrix `build_dataset` orders in place: the
    trust fit's pool is a view of them, not a second copy of every row (10k rows: 46 MiB)."""
    y = np.repeat(np.arange(2), 100)
    matrix = (RNG.normal(0, 1, (200, 6)) + y[:, None]).astype(np.float32)
    entries = [CatalogEntry(f"{'ab'[label]}/{i}.jpg", "ab"[label], f"{i:064x}", 1, 1, True) for i, label in enumerate(y)]
    dataset = build_dataset(entries, matrix, SplitConfig(validation_percentage=20, testing_percentage=20))
    pool = TrustFit(dataset, Hooks(make_plugin_manager())).pool
    assert np.shares_memory(pool.x, matrix) and len(dataset.parts["validation"].y) > 0
    assert np.array_equal(pool.x, np.concatenate([dataset.parts["train"].x, dataset.parts["validation"].x]))
    assert pool.paths == dataset.parts["train"].paths + dataset.parts["validation"].paths


class _GroupScorer:
    """Scores every row of a held-out group with the group's first row index, and counts the calls."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []

    @hookimpl
    def retraind_held_out_scorer(self, novelty: object, x: np.ndarray, labels: np.ndarray) -> Any:
        def scores(group: np.ndarray) -> np.ndarray:
            self.groups.append(sorted(group.tolist()))
            return np.full(len(group), float(group.min()), dtype=np.float32)

        return scores


def test_a_plugin_scores_each_held_out_group_once_and_the_scores_land_on_their_rows() -> None:
    """`retraind_held_out_scorer`'s function runs once per fold and once per class left out (as one job each
    on the trust fit's workers); each fold's scores are its rows' out-of-fold novelty, on any thread count."""
    dataset = _dataset()
    for threads in (1, 3):
        scorer = _GroupScorer()
        hooks = Hooks(make_plugin_manager(extra=(scorer,)))
        head = hooks.train_head(dataset, TrainingConfig())
        assert head is not None
        fitted = fit_trust(head, dataset, hooks, TrainingConfig(), ClassifyConfig(), {}, threads=threads)
        folds = {row["fold"] for row in fitted.out_of_fold}
        assert len(scorer.groups) == len(folds) + 2  # 5 folds, 2 classes left out
        first_of = {fold: min(i for i, row in enumerate(fitted.out_of_fold) if row["fold"] == fold) for fold in folds}
        assert all(row["novelty"] == first_of[row["fold"]] for row in fitted.out_of_fold)
        assert sorted(scorer.groups[len(folds):]) == [list(range(60)), list(range(60, 120))]


class _HoldingScorer:
    """Holds the first held-out group until released, and signals when a second group starts meanwhile."""

    def __init__(self) -> None:
        self.first_started, self.second_started, self.release = (threading.Event() for _ in range(3))
        self.calls = 0
        self.lock = threading.Lock()

    @hookimpl
    def retraind_held_out_scorer(self, novelty: object, x: np.ndarray, labels: np.ndarray) -> Any:
        def scores(group: np.ndarray) -> np.ndarray:
            with self.lock:
                self.calls += 1
                call = self.calls
            if call == 1:
                self.first_started.set()
                self.release.wait(timeout=30)
            elif call == 2:
                self.second_started.set()
            return np.zeros(len(group), dtype=np.float32)

        return scores


def test_the_novelty_scoring_leaves_the_head_a_core_until_the_head_is_fitted() -> None:
    """While the trainer fits the served head, the held-out groups are scored on one worker fewer than the
    trust fit has (three busy threads on two cores starved the head the fold heads wait for); once the head is
    fitted, every worker scores."""
    dataset = _dataset()
    scorer = _HoldingScorer()
    hooks = Hooks(make_plugin_manager(extra=(scorer,)))
    head = hooks.train_head(dataset, TrainingConfig())
    assert head is not None
    with TrustFit(dataset, hooks, threads=2) as trust_fit:
        try:
            assert scorer.first_started.wait(timeout=30)
            assert not scorer.second_started.wait(timeout=0.3)  # the other worker stays free for the head
            trust_fit.head_fitted()
            assert scorer.second_started.wait(timeout=30)  # beside the first group, still held
        finally:
            scorer.release.set()
        fitted = trust_fit.finish(head, TrainingConfig(), ClassifyConfig(), {})
    assert scorer.calls == 5 + 2 and len(fitted.out_of_fold) == 120
