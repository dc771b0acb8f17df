"""Default novelty score: class-conditional Mahalanobis distance on the bottlenecks (daemon/novelty.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daemon.hookspecs import hookimpl
from daemon.novelty import ClassMahalanobis


@hookimpl(trylast=True)
def retraind_fit_novelty(x: np.ndarray, labels: np.ndarray) -> ClassMahalanobis:
    return ClassMahalanobis.fit(x, labels)


@hookimpl(trylast=True)
def retraind_score_held_out(name: str, x: np.ndarray, labels: np.ndarray,
                            groups: list[np.ndarray]) -> list[np.ndarray] | None:
    return ClassMahalanobis.held_out_scores(x, labels, groups) if name == ClassMahalanobis.name else None


@hookimpl(trylast=True)
def retraind_load_novelty(name: str, directory: Path) -> ClassMahalanobis | None:
    return ClassMahalanobis.load(directory) if name == ClassMahalanobis.name else None
