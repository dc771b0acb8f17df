"""What the retrain decision sees (the `retraind_should_retrain` hook's argument)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetrainState:
    """Monotonic times: the first and last change since the last run, and now; `forced` by the API or CLI;
    `waiting`: training files seen and not yet cached (a backlog being cached, files still being written)."""

    first_change: float
    last_change: float
    now: float
    changes: int
    quiet_period_seconds: float
    forced: bool = False
    waiting: int = 0

    def quiet(self) -> bool:
        """The default rule: forced, or nothing waiting to be cached and no change for `quiet_period_seconds`
        (a head trained while images are still being cached would be thrown away at once)."""
        return self.forced or (not self.waiting and self.now - self.last_change >= self.quiet_period_seconds)
