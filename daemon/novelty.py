"""Novelty: how unlike every taught class an image's bottleneck is, and where "unfamiliar" starts.

The built-in score is the class-conditional Mahalanobis distance (Lee et al. 2018, "A Simple Unified
Framework for Detecting Out-of-Distribution Samples"): the squared distance to the nearest class mean of the
cached bottlenecks under their shared (tied) within-class covariance, shrunk towards a multiple of the
identity because a 1280-dimensional covariance is estimated from a few hundred images. On tuxpaint6
(EfficientNet-Lite0, 4 taught classes, 2 untaught) its AUROC was 0.92 against 0.88 for max-softmax, 0.89
for energy and 0.91 for the nearest neighbour's cosine distance (bench/trust.py prints the first two).

The threshold is set without real unknowns: each taught class in turn plays the unknown (leave-one-class-out,
LOCO) against a score fitted on the others, and the threshold maximises Youden's J — the share of known
images kept minus the share of stand-in unknowns kept — with the known images scored out-of-fold. A user who
would rather bound the known images sent to review (`classify.novelty_false_alarm_rate`, the Neyman–Pearson
way, like out-of-distribution work's "FPR at 95% TPR") gets the conformal quantile of the out-of-fold known
scores instead (`false_alarm_threshold`); Youden's J stays the default because on tuxpaint6 it sits on the
same trade-off curve while adapting to how separable the classes are (README "Filing").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from daemon.nogil_lapack import cholesky_lower, solve_lower

#: Shrinkage of the tied covariance towards (trace / dim) · I.
SHRINKAGE = 0.3
#: Rows a score is fitted on at most (evenly spread), so a 50k-image set costs what 4k do.
MAX_FIT_ROWS = 4000
#: Rows per block where a (dim, dim) or (dim, n) float64 temporary would otherwise be made whole (2.5 MiB each)
_BLOCK = 256
_SPENT = np.empty((0, 0))
#: Classes that play the unknown at most (evenly spread over the labels).
MAX_LOCO_CLASSES = 12


class NoveltyScore(Protocol):
    """Scores bottlenecks (n, dim) → (n,) float, higher = less like the training set.

    `name` selects the plugin that loads it again (`retraind_load_novelty`); `save` writes whatever it needs
    into a version folder."""

    name: str

    def score(self, x: np.ndarray) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...


def spread(count: int, keep: int) -> np.ndarray:
    """`keep` indices evenly spread over range(count) (all of them when count <= keep)."""
    if count <= keep:
        return np.arange(count)
    return np.linspace(0, count - 1, keep).astype(np.int64)


class _Scatter:
    """What a tied within-class covariance is made of: Σ x·xᵀ (dim, dim) float64, each class's Σ x (classes,
    dim) and row count (classes,), of bottlenecks centred on one offset. Statistics of disjoint rows add and
    subtract, so a fit without some rows costs a subtraction, not a pass over the others."""

    def __init__(self, matrix: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
        self.matrix, self.sums, self.counts = matrix, sums, counts

    @classmethod
    def of(cls, centred: np.ndarray, positions: np.ndarray, classes: int) -> _Scatter:
        """From centred float32 rows (n, dim) and their class positions (n,) in range(classes). The product
        runs in float32 (twice as fast; the centring keeps it accurate), the rest in float64."""
        onehot = np.zeros((classes, len(positions)), dtype=np.float64)
        onehot[positions, np.arange(len(positions))] = 1.0
        return cls((centred.T @ centred).astype(np.float64), onehot @ centred,
                   np.bincount(positions, minlength=classes))

    def without(self, part: _Scatter) -> _Scatter:
        """These statistics less `part`'s (rows among these), written over `part`'s own arrays: a held-out
        group's fit allocates one (dim, dim) float64 matrix, not two."""
        np.subtract(self.matrix, part.matrix, out=part.matrix)
        return _Scatter(part.matrix, self.sums - part.sums, self.counts - part.counts)

    def factor(self, shrinkage: float, consume: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The present classes' centred means (classes', dim) float64 and the lower Cholesky factor L (dim, dim)
        float32 of the covariance shrunk towards (trace / dim) · I (its condition number is at most
        1 + (1 − shrinkage) / shrinkage × largest eigenvalue / mean eigenvalue, so float32 loses ~1e-5 at
        worst, and factors it twice as fast); raises ValueError for no rows. `consume`: these statistics are a
        temporary (a held-out group's): their float64 matrix is overwritten and released before the factor is
        made, and this object is spent."""
        present = self.counts > 0
        if not present.any():
            raise ValueError("a novelty score needs at least one image")
        sums, counts = self.sums[present], self.counts[present]
        scatter = self.matrix
        within = scatter if consume else np.empty_like(scatter)
        if consume:
            self.matrix = _SPENT
        weighted = sums.T / counts
        for start in range(0, len(within), _BLOCK):  # in row blocks: no second (dim, dim) float64 matrix
            rows = slice(start, start + _BLOCK)
            np.subtract(scatter[rows], weighted[rows] @ sums, out=within[rows])  # float64: it cancels
        total = int(counts.sum())
        scale = float(np.trace(within)) / (total * within.shape[0]) or 1.0
        covariance = within.astype(np.float32)  # scaled and shrunk in float32: 2 passes of 13 MB fewer per fit
        del within, scatter
        covariance *= (1 - shrinkage) / total
        covariance.flat[:: covariance.shape[0] + 1] += shrinkage * scale
        return sums / counts[:, None], cholesky_lower(covariance)  # without the GIL: the heads' steps go on


class ClassMahalanobis:
    """min over classes c of (x − μ_c)ᵀ Σ⁻¹ (x − μ_c), computed as |x·T − μ_c·T|² with Σ⁻¹ = T·Tᵀ (T = L⁻ᵀ
    for the Cholesky factor Σ = L·Lᵀ)."""

    name = "class_mahalanobis"
    FILE = "novelty.npz"

    def __init__(self, transform: np.ndarray, means: np.ndarray, fit_rows: _FitRows | None = None) -> None:
        self.transform = transform  # T, (dim, dim)
        self.means = means  # μ_c · T, (classes, dim)
        self._fit_rows = fit_rows  # what `fit` used, handed once to `held_out_scorer`; never saved

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, shrinkage: float = SHRINKAGE) -> ClassMahalanobis:
        """Fit on bottlenecks `x` (n, dim) with label indices `y` (n,), at most MAX_FIT_ROWS of them (evenly
        spread); raises ValueError for no rows."""
        if not len(y):
            raise ValueError("a novelty score needs at least one image")
        pool = _FitRows(x, y)
        means, factor = pool.scatter.factor(shrinkage)
        from scipy.linalg import lapack

        inverse, info = lapack.dtrtri(factor, lower=1)  # L⁻¹, lower triangular
        if info:
            raise np.linalg.LinAlgError(f"the covariance factor is singular (trtri info {info})")
        transform = inverse.T
        return cls(transform.astype(np.float32), ((means + pool.offset) @ transform).astype(np.float32), pool)

    def held_out_scorer(self, x: np.ndarray, y: np.ndarray,
                        shrinkage: float = SHRINKAGE) -> Callable[[np.ndarray], np.ndarray]:
        """For this score fitted by `fit(x, y)`: a function that scores a group (int64 row indices into `x`)
        as the score fitted on the rows `fit(x, y)` takes, less the group's, would: (len(group),) float32.
        One scatter matrix serves every group, less the group's share (K folds and the classes left out cost
        one pass over their rows each, not one fit each); the fit's own statistics are reused, and then
        dropped from this score. The function may run on several threads at once."""
        pool, self._fit_rows = self._fit_rows or _FitRows(x, y), None

        def scores(group: np.ndarray) -> np.ndarray:
            inside = np.zeros(len(y), dtype=bool)
            inside[group] = True
            means, factor = pool.scatter.without(pool.scatter_of(inside[pool.rows])).factor(shrinkage, consume=True)
            return _distances(factor, pool.centred(x[group]), means.astype(np.float32))

        return scores

    def score(self, x: np.ndarray) -> np.ndarray:
        z = np.asarray(x, dtype=np.float32) @ self.transform
        best = np.full(len(z), np.inf, dtype=np.float32)
        for mean in self.means:  # differences, not |z|² − 2z·μ + |μ|², which cancels badly in float32
            np.minimum(best, ((z - mean) ** 2).sum(axis=1), out=best)
        return best

    def save(self, directory: Path) -> None:
        with (directory / self.FILE).open("wb") as fh:
            np.savez(fh, transform=self.transform, means=self.means)

    @classmethod
    def load(cls, directory: Path) -> ClassMahalanobis:
        with np.load(directory / cls.FILE) as data:
            return cls(data["transform"], data["means"])


class _FitRows:
    """The rows a score is fitted on (at most MAX_FIT_ROWS, evenly spread), centred on their mean, with their
    scatter statistics; class positions index np.unique(y) of all of `y`."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.rows = spread(len(y), MAX_FIT_ROWS)
        # float32 values (kept as float64 for the means): the rows are centred in float32, with no float64 copy
        self.offset = np.asarray(x[self.rows], dtype=np.float64).mean(axis=0).astype(np.float32).astype(np.float64)
        self._offset32 = self.offset.astype(np.float32)
        self.classes, positions = np.unique(y, return_inverse=True)
        self.positions = positions.reshape(-1)[self.rows]
        self.x = self.centred(x[self.rows])
        self.scatter = _Scatter.of(self.x, self.positions, len(self.classes))

    def centred(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32) - self._offset32  # type: ignore[no-any-return]

    def scatter_of(self, mask: np.ndarray) -> _Scatter:
        """The statistics of the fit rows where `mask` (len(rows),) is true."""
        return _Scatter.of(self.x[mask], self.positions[mask], len(self.classes))


def _distances(factor: np.ndarray, centred: np.ndarray, means: np.ndarray) -> np.ndarray:
    """min_c |L⁻¹(x − μ_c)|² (n,) float32 for centred rows (n, dim) and centred means (classes, dim): one
    triangular solve (no inverse is formed; without the GIL), then |z|² − 2·z·m_c + |m_c|² in float64
    (float32 would cancel badly where z is near a class centre)."""
    solved = solve_lower(factor, np.concatenate([centred, means]))
    centres = solved[:, len(centred):].astype(np.float64)
    lengths = np.einsum("dc,dc->c", centres, centres)
    best = np.empty(len(centred), dtype=np.float32)
    for start in range(0, len(centred), _BLOCK):  # float64 a block of rows at a time, not the whole group
        z = solved[:, start:min(start + _BLOCK, len(centred))].astype(np.float64)
        squared = np.einsum("dn,dn->n", z, z)[:, None] - 2 * (z.T @ centres) + lengths
        best[start:start + len(squared)] = np.maximum(squared.min(axis=1), 0.0)
    return best


def youden_threshold(known: np.ndarray, unknown: np.ndarray) -> float:
    """The score threshold (keep when score <= it) that maximises kept-known share minus kept-unknown
    share; with no stand-in unknowns, the largest known score (nothing known is turned away)."""
    if not len(unknown):
        return float(known.max())
    candidates = np.unique(np.concatenate([known, unknown]))
    kept_known = np.searchsorted(np.sort(known), candidates, side="right") / len(known)
    kept_unknown = np.searchsorted(np.sort(unknown), candidates, side="right") / len(unknown)
    return float(candidates[int(np.argmax(kept_known - kept_unknown))])


def false_alarm_threshold(known: np.ndarray, rate: float) -> float:
    """The score threshold (keep when score <= it) that turns away at most a share `rate` of new known
    images, from held-out known scores (n,): the ⌈(n + 1)(1 − rate)⌉-th smallest, the split-conformal
    quantile (Vovk et al. 2005; Bates et al. 2023, "Testing for outliers with conformal p-values"), so
    P(score > threshold) <= rate for a new image exchangeable with the held-out ones. When n is too small for
    that rank (n + 1 < 1 / rate), the largest known score. Raises ValueError for no scores."""
    if not len(known):
        raise ValueError("a false-alarm threshold needs at least one held-out known score")
    rank = math.ceil((len(known) + 1) * (1.0 - rate))
    return float(np.sort(known)[min(rank, len(known)) - 1])


def auroc(known: np.ndarray, unknown: np.ndarray) -> float | None:
    """Area under the ROC curve of a score that should be higher for `unknown` than for `known` (ties count
    half); None when either side is empty."""
    if not len(known) or not len(unknown):
        return None
    both = np.concatenate([known, unknown])
    order = np.argsort(both, kind="stable")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    ranks[order] = np.arange(1, len(both) + 1)
    for value in np.unique(sorted_values[np.r_[False, sorted_values[1:] == sorted_values[:-1]]]):
        tied = both == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2) / (len(known) * len(unknown)))
