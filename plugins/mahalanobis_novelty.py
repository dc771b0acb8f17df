"""Default novelty score: class-conditional Mahalanobis distance on the bottlenecks (daemon/novelty.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from daemon.hookspecs import hookimpl
from daemon.novelty import ClassMahalanobis, NoveltyScore


@hookimpl
def retraind_on_training_pending() -> None:
    import scipy.linalg  # noqa: F401 - a fresh process's first import: in the quiet period, not on the first run's path


@hookimpl(trylast=True)
def retraind_fit_novelty(x: np.ndarray, labels: np.ndarray) -> ClassMahalanobis:
    return ClassMahalanobis.fit(x, labels)


@hookimpl(trylast=True)
def retraind_held_out_scorer(novelty: NoveltyScore, x: np.ndarray,
                             labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    return novelty.held_out_scorer(x, labels) if isinstance(novelty, ClassMahalanobis) else None


@hookimpl(trylast=True)
def retraind_load_novelty(name: str, directory: Path) -> ClassMahalanobis | None:
    return ClassMahalanobis.load(directory) if name == ClassMahalanobis.name else None
