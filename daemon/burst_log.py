"""One INFO line per event while events are few; during a burst, one summary line instead of thousands.

The first `lines` events of a `window` are logged as they come; the rest are counted by a short key (where
the file went) and told in one line when the window ends, e.g. `... and 488 more inbox files classified in
the last 10 s (outbox/red: 300, review: 188)`. `flush()` is called often (every pipeline loop) so the summary
comes soon after a burst ends, not only with the next event.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable


class BurstLog:
    def __init__(self, logger: logging.Logger, what: str, lines: int = 10, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._what, self._lines, self._window, self._clock = logger, what, lines, window, clock
        self._started = -window  # no window open
        self._shown = 0
        self._held: Counter[str] = Counter()

    def info(self, key: str, message: str, *args: object) -> None:
        """Log `message % args` now, or count it under `key` for the summary when the window is full."""
        now = self._clock()
        self._roll(now)
        if self._shown == 0 and not self._held:
            self._started = now  # the first event opens a window
        if self._shown < self._lines:
            self._shown += 1
            self._log.info(message, *args)
        else:
            self._held[key] += 1

    def flush(self) -> None:
        """Tell what was held back, once its window has ended."""
        self._roll(self._clock())

    def _roll(self, now: float) -> None:
        if now - self._started < self._window:
            return
        if self._held:
            counts = ", ".join(f"{key}: {n}" for key, n in self._held.most_common())
            self._log.info("... and %d more %s in the last %.0f s (%s)", sum(self._held.values()), self._what,
                           now - self._started, counts)
        self._shown = 0
        self._held.clear()
