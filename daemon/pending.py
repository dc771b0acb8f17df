"""Files seen but not yet taken: a file is due once closed after writing, or once its size and mtime have not
changed for `settle_seconds` (for writers that give no close event, and for names that look temporary and may
still be renamed, as rsync does)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".swp", "~", ".download")


def looks_temporary(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower().endswith(_TEMP_SUFFIXES)


@dataclass
class _Seen:
    signature: tuple[int, int] | None
    since: float
    closed: bool


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


class PendingFiles:
    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._seen: dict[Path, _Seen] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, path: Path) -> bool:
        return path in self._seen

    def add(self, path: Path, closed: bool) -> None:
        """Note activity on `path`; `closed` when the writer has closed it (or it was renamed into place)."""
        self._seen[path] = _Seen(_signature(path), time.monotonic(), closed and not looks_temporary(path))

    def paths(self) -> list[Path]:
        return list(self._seen)

    def discard(self, path: Path) -> None:
        self._seen.pop(path, None)

    def due(self) -> list[Path]:
        """Pop the files ready to process; files that vanished are dropped, changed ones wait again."""
        now = time.monotonic()
        ready: list[Path] = []
        for path, seen in list(self._seen.items()):
            signature = _signature(path)
            if signature is None and not os.path.islink(path):
                del self._seen[path]
            elif seen.closed or (signature == seen.signature and now - seen.since >= self.settle_seconds):
                ready.append(path)
                del self._seen[path]
            elif signature != seen.signature:
                self._seen[path] = _Seen(signature, now, False)
        return ready

    def next_deadline(self) -> float | None:
        """Seconds until the next file could be due, for the worker's wait."""
        if not self._seen:
            return None
        now = time.monotonic()
        return max(0.0, min(s.since + self.settle_seconds - now for s in self._seen.values()))
