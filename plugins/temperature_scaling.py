"""Default calibrator: temperature scaling fitted on out-of-fold logits (daemon/calibration.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daemon.calibration import TemperatureScaling
from daemon.hookspecs import hookimpl


@hookimpl(trylast=True)
def retraind_fit_calibrator(logits: np.ndarray, labels: np.ndarray) -> TemperatureScaling:
    return TemperatureScaling.fit(logits, labels)


@hookimpl(trylast=True)
def retraind_load_calibrator(name: str, directory: Path) -> TemperatureScaling | None:
    return TemperatureScaling.load(directory) if name == TemperatureScaling.name else None
