"""Default retrain policy: train once the training set has been quiet for `training.quiet_period_seconds`."""

from __future__ import annotations

from daemon.hookspecs import hookimpl
from daemon.retrain_policy import RetrainState


@hookimpl(trylast=True)
def retraind_should_retrain(state: RetrainState) -> bool:
    return state.quiet()
