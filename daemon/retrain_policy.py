"""What the retrain decision sees (the `retraind_should_retrain` hook's argument)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetrainState:
    """Monotonic times: the first and last change since the last run, and now; `forced` by the API or CLI."""

    first_change: float
    last_change: float
    now: float
    changes: int
    quiet_period_seconds: float
    forced: bool = False

    def quiet(self) -> bool:
        """The default rule: forced, or no change for `quiet_period_seconds`."""
        return self.forced or self.now - self.last_change >= self.quiet_period_seconds
