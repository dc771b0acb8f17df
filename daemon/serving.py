"""The model serving now, swapped in one assignment so readers never see half a swap."""

from __future__ import annotations

import numpy as np

from daemon import trust
from daemon.registry import ModelVersion


class ServingModel:
    def __init__(self) -> None:
        self._version: ModelVersion | None = None
        #: the last head the gate rejected (TF Serving's `candidate` label), if any since start
        self.candidate: ModelVersion | None = None

    @property
    def version(self) -> ModelVersion | None:
        return self._version

    def swap(self, version: ModelVersion) -> None:
        self._version = version

    @staticmethod
    def top_k(version: ModelVersion, vectors: np.ndarray, k: int) -> list[tuple[tuple[str, float], ...]]:
        """Best `k` (label, score) pairs per row, highest first, scored by `version`'s head and calibrator."""
        probabilities = trust.probabilities(version, vectors)
        order = np.argsort(-probabilities, axis=1)[:, :k]
        return [
            tuple((version.labels[int(i)], round(float(row[i]), 6)) for i in idx)
            for row, idx in zip(probabilities, order)
        ]
