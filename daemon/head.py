"""The classifier head: a softmax layer over bottlenecks, kept as numpy arrays so serving needs no graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Head:
    """`weights` (dim, classes) and `bias` (classes,); `history` holds per-epoch curves for the plots."""

    weights: np.ndarray
    bias: np.ndarray
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Unnormalised scores (n, classes) of bottlenecks (n, dim)."""
        return np.asarray(x, dtype=np.float32) @ self.weights + self.bias  # type: ignore[no-any-return]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        logits = self.logits(x)  # no copy of float32 input
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez(fh, weights=self.weights, bias=self.bias)

    @classmethod
    def load(cls, path: Path) -> Head:
        with path.open("rb") as file, np.load(file) as data:  # numpy's own open leaks on a damaged file
            return cls(weights=data["weights"].astype(np.float32), bias=data["bias"].astype(np.float32))


def accuracy(head: Head, x: np.ndarray, y: np.ndarray) -> float | None:
    """Fraction of rows whose top-1 is right; None for an empty split (not 0: nothing was measured)."""
    if len(y) == 0:
        return None
    return float(np.mean(head.probabilities(x).argmax(axis=1) == y))
