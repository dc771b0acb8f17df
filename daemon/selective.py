"""The review threshold for a precision the user chooses: selection with guaranteed risk (SGR, Geifman &
El-Yaniv 2017, "Selective Classification for Deep Neural Networks", Algorithm 1).

Given held-out top-1 scores and whether each top-1 was right, SGR binary-searches the lowest score threshold
whose filed images have a risk (1 − precision) whose binomial upper confidence bound is at most the target
risk. The bound holds with probability 1 − δ over the draw of the held-out images: each of the k tests uses
δ / k (a union bound), and each bound is the exact binomial tail inversion (Clopper–Pearson).

One departure from Algorithm 1: before bisecting, the search tests filing every held-out image (k = ⌈log2 m⌉
+ 1 tests in all). The bisection's first probe files half of them, and a bound on half the images is looser
than on all: a perfect record of 41–79 images proves the 90% target when all are filed but not when half
are, so Algorithm 1 alone filed nothing for a small, clean training set. With too few held-out images even
a perfect record cannot prove the target (all m right proves a risk below 1 − (δ/k)^(1/m)), and the search
returns None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The guarantee fails with probability at most DELTA over the draw of the held-out images.
DELTA = 0.1


@dataclass(frozen=True)
class SelectiveThreshold:
    """`threshold` on the top-1 score (file when score >= threshold), with what it gave on the held-out rows:
    `coverage` (share filed), `precision` (share of filed that were right) and `precision_bound` (the lower
    confidence bound that is at least the target)."""

    threshold: float
    coverage: float
    precision: float
    precision_bound: float


def risk_upper_bound(errors: int, n: int, delta: float) -> float:
    """The largest risk b with P(Binomial(n, b) <= errors) >= delta: an upper bound on the true error rate
    that holds with probability 1 − delta (Clopper–Pearson). 1.0 when every one of the `n` was wrong."""
    if errors >= n:
        return 1.0
    from scipy.special import betaincinv  # lazily: scipy is only needed when a model version is fitted

    return float(betaincinv(errors + 1, n - errors, 1.0 - delta))


def sgr_threshold(scores: np.ndarray, correct: np.ndarray, target_precision: float,
                  delta: float = DELTA) -> SelectiveThreshold | None:
    """The SGR threshold over held-out `scores` (m,) and `correct` (m,) booleans; None when no threshold's
    bound reaches `target_precision` (too few held-out images, or a head that is not that good)."""
    m = len(scores)
    if m == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    ranked, right = scores[order], correct[order].astype(bool)
    errors_before = np.concatenate([[0], np.cumsum(~right)])
    steps = max(1, math.ceil(math.log2(m)))
    tests = steps + 1  # filing every image, then the bisection's steps
    target_risk = 1.0 - target_precision

    def tested(z: int) -> SelectiveThreshold | None:
        """Filing the z best-scored images (and any tied with the z-th): its result if the bound holds."""
        threshold = float(ranked[z - 1])
        filed = int(np.searchsorted(-ranked, -threshold, side="right"))  # ties with the threshold are filed
        errors = int(errors_before[filed])
        bound = risk_upper_bound(errors, filed, delta / tests)
        if bound > target_risk:
            return None
        return SelectiveThreshold(threshold, filed / m, 1.0 - errors / filed, 1.0 - bound)

    found = tested(m)
    if found is not None:
        return found
    low, high = 1, m - 1  # search the number of filed images, z, in [low, high]
    for _ in range(steps):
        if low > high:
            break
        z = (low + high + 1) // 2
        result = tested(z)
        if result is not None:
            found, low = result, z + 1
        else:
            high = z - 1
    return found
