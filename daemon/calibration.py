"""Calibration: turning a head's logits into top-1 scores that are probabilities, and measuring how far they are.

A calibrator is fitted per model version on out-of-fold logits (predictions for images the fitting head did
not see, daemon/trust.py), through the `retraind_fit_calibrator` hook; the built-in one is temperature scaling
(Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T, probabilities softmax(logits / T),
T chosen to minimise the negative log-likelihood. It keeps the arg-max, so accuracy does not move.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

#: Bins of the expected calibration error (equal width over [0, 1], Naeini et al. 2015; Guo et al. 2017).
ECE_BINS = 10


class Calibrator(Protocol):
    """Maps logits (n, classes) to probabilities (n, classes), rows summing to 1.

    `name` selects the plugin that loads it again (`retraind_load_calibrator`); `parameters` is a small JSON
    object recorded in the version's `metrics.json`; `save` writes whatever it needs into a version folder."""

    name: str

    @property
    def parameters(self) -> dict[str, Any]: ...

    def probabilities(self, logits: np.ndarray) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, classes) logits, in float64 so that confident rows do not round to exactly 1."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    exp = np.exp(z)
    return exp / exp.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """ECE of the top-1 scores: the image-weighted mean |accuracy − mean score| over equal-width score bins.

    `probabilities` (n, classes), `y` (n,) true label indices. None for no rows (nothing was measured)."""
    return binned_calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == y, bins)


def binned_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """ECE from top-1 scores (n,) and whether each top-1 was right (n,) booleans; None for no rows."""
    if not len(confidence):
        return None
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in np.unique(which):
        in_bin = which == b
        total += float(in_bin.mean()) * abs(float(confidence[in_bin].mean()) - float(correct[in_bin].mean()))
    return total


class _Nll:
    """The mean negative log-likelihood of softmax(logits / T) as a function of T, for one set of logits
    (n, classes) and labels (n,): the row maxima and the labels' logits are taken once, not once per T
    (dividing by T > 0 keeps the maximum where it is)."""

    def __init__(self, logits: np.ndarray, y: np.ndarray) -> None:
        self.shifted = logits - logits.max(axis=1, keepdims=True)
        self.chosen = self.shifted[np.arange(len(y)), y]

    def __call__(self, temperature: float) -> float:
        log_p = self.chosen / temperature - np.log(np.exp(self.shifted / temperature).sum(axis=1))
        return float(-log_p.mean())


class TemperatureScaling:
    """softmax(logits / T); T > 1 softens an over-confident head, T < 1 sharpens a timid one."""

    name = "temperature"
    FILE = "calibration.json"

    def __init__(self, temperature: float) -> None:
        self.temperature = float(temperature)

    @property
    def parameters(self) -> dict[str, Any]:
        return {"temperature": round(self.temperature, 6)}

    #: The range T is searched in. When the out-of-fold predictions are all right, the likelihood keeps growing
    #: as T → 0 and every score would saturate at 1; the floor keeps a few dozen perfect predictions from
    #: claiming certainty.
    LOWEST, HIGHEST = 0.25, 20.0

    @classmethod
    def fit(cls, logits: np.ndarray, y: np.ndarray) -> TemperatureScaling:
        """The T in [LOWEST, HIGHEST] of least negative log-likelihood. The NLL is convex in 1/T, so it has one
        minimum in log T: Brent's bounded search finds it to 1e-5 in ~25 evaluations (a 91-point grid took
        3x as long and was ~0.5% coarse), and the bounds themselves are compared too (all predictions right:
        the floor, LOWEST)."""
        logits = np.asarray(logits, dtype=np.float64)
        if not len(y):
            return cls(1.0)
        from scipy.optimize import minimize_scalar

        nll = _Nll(logits, y)
        found = minimize_scalar(lambda log_t: nll(float(np.exp(log_t))), method="bounded",
                                bounds=(np.log(cls.LOWEST), np.log(cls.HIGHEST)), options={"xatol": 1e-5})
        # on a tie (a flat NLL: every prediction right) the lowest, where such a likelihood only grows
        candidates = (cls.LOWEST, float(np.exp(found.x)), cls.HIGHEST)
        return cls(min(candidates, key=nll))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def save(self, directory: Path) -> None:
        (directory / self.FILE).write_text(json.dumps(self.parameters), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> TemperatureScaling:
        return cls(json.loads((directory / cls.FILE).read_text(encoding="utf-8"))["temperature"])
