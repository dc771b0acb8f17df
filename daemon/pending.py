"""Files seen but not yet taken, and when each is due.

Watchdog says "created" before a copy is done, and a writer may pause between chunks for longer than any
quiet period. So a file is due:
- once its writer closed it (a close-after-write event, or it was renamed into place) and it has not changed
  since;
- once unchanged for `settle_seconds × WRITING_FACTOR` when it was seen growing and no close came (writers
  on platforms without close events, or whose close event was lost);
- once unchanged for `settle_seconds` otherwise (moved in from outside, found by a scan, attributes touched).
A name that looks like a writer's working name (rsync's `.name.XXXXXX`, `*.part`, ...) is about to be renamed:
it waits `settle_seconds × TEMPORARY_FACTOR` even when closed. An empty file beside its own working copy
(`photo.jpg` of 0 bytes beside `photo.jpg.part`: Firefox makes that placeholder when a download starts and
renames the `.part` onto it when it ends) is not complete either: it waits, looked at again every
`settle_seconds × TEMPORARY_FACTOR` (at least `PLACEHOLDER_RECHECK_SECONDS`), until the rename fills it or the
working copy is gone (a cancelled download; then it is taken, and rejected as empty). A file that failed can
be held back until a retry time.
"""

from __future__ import annotations

import heapq
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.events import EventKind

WRITING_FACTOR = 10.0
TEMPORARY_FACTOR = 10.0
#: The working copies a download or a writer fills beside the placeholder it made under the final name.
_WORKING_COPY_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".tmp")
#: A writer's working names: those, an editor's swap file, a backup copy.
_TEMP_SUFFIXES = (*_WORKING_COPY_SUFFIXES, ".swp", "~")
PLACEHOLDER_RECHECK_SECONDS = 1.0
_RSYNC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9]{6}$")  # rsync writes `.name.XXXXXX`, then renames to `name`


def looks_temporary(path: Path) -> bool:
    name = path.name
    return bool(_RSYNC_TEMP.match(name)) or name.startswith((".#", ".~")) or name.lower().endswith(_TEMP_SUFFIXES)


def is_placeholder(path: Path) -> bool:
    """Whether `path`, an empty file, has a working copy of its own name beside it (`photo.jpg.part`)."""
    name = os.fspath(path)
    return any(os.path.lexists(name + suffix) for suffix in _WORKING_COPY_SUFFIXES)


Signature = tuple[int, int] | None


def _signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


@dataclass
class _Seen:
    signature: Signature
    since: float  # when the signature last changed (or the file was first seen)
    closed: bool  # closed by its writer since its content last changed
    writing: bool  # seen growing, and no close since
    temporary: bool  # a writer's working name
    not_before: float = 0.0
    recheck: float = 0.0  # an empty placeholder (`is_placeholder`): not before this, unless it changes
    turn: int = 0  # which heap entry is this file's current one (older entries are skipped)

    def deadline(self, settle: float) -> float:
        if self.temporary:
            wait = settle * TEMPORARY_FACTOR
        elif self.closed:
            wait = 0.0
        else:
            wait = settle * WRITING_FACTOR if self.writing else settle
        return max(self.not_before, self.recheck, self.since + wait)


def _size_changed(old: Signature, new: Signature) -> bool:
    return old is None or new is None or old[0] != new[0]


class PendingFiles:
    """The files and a heap of their deadlines: a turn looks only at the files that are due (O(due), not
    O(pending)); each is stat'ed once more when due, and waits again if it changed meanwhile."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._seen: dict[Path, _Seen] = {}
        self._heap: list[tuple[float, int, Path]] = []
        self._turns = 0

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, path: Path) -> bool:
        return path in self._seen

    def _schedule(self, path: Path, seen: _Seen) -> None:
        self._turns += 1
        seen.turn = self._turns
        heapq.heappush(self._heap, (seen.deadline(self.settle_seconds), self._turns, path))
        if len(self._heap) > 2 * len(self._seen) + 64:  # drop the entries of files taken or changed since
            self._heap = [item for item in self._heap if self._current(item)]
            heapq.heapify(self._heap)

    def _current(self, item: tuple[float, int, Path]) -> bool:
        seen = self._seen.get(item[2])
        return seen is not None and seen.turn == item[1]

    def add(self, path: Path, kind: EventKind) -> None:
        """Note what happened to `path`: CLOSED or MOVED (into place), MODIFIED, CREATED or SCANNED. A CREATED
        for a file already known (watchdog reports the files of a folder moved in as created after the move)
        does not undo a close."""
        now, signature = time.monotonic(), _signature(path)
        seen = self._seen.get(path)
        if seen is None:
            seen = self._seen[path] = _Seen(signature, now, False, kind is EventKind.MODIFIED, looks_temporary(path))
        if kind in (EventKind.CLOSED, EventKind.MOVED):
            seen.closed, seen.writing = True, False
        elif kind is EventKind.MODIFIED and (not seen.closed or _size_changed(seen.signature, signature)):
            seen.closed, seen.writing = False, True  # being written; after a close, only a new size says so
        if signature != seen.signature:
            seen.signature, seen.since, seen.recheck = signature, now, 0.0
        self._schedule(path, seen)

    def retry(self, path: Path, delay: float) -> None:
        """Take `path` again (as complete) after `delay` seconds, unless it changes or goes meanwhile."""
        now = time.monotonic()
        seen = self._seen[path] = _Seen(_signature(path), now, True, False, looks_temporary(path), now + delay)
        self._schedule(path, seen)

    def discard(self, path: Path) -> None:
        self._seen.pop(path, None)

    def due(self) -> list[Path]:
        """Pop the files ready to process; files that vanished are dropped, changed ones and placeholders wait
        again."""
        now = time.monotonic()
        ready: list[Path] = []
        waiting: list[Path] = []
        while self._heap and self._heap[0][0] <= now:
            item = heapq.heappop(self._heap)
            if not self._current(item):
                continue
            path = item[2]
            seen = self._seen[path]
            signature = _signature(path)
            if signature is None and not os.path.islink(path):
                del self._seen[path]
            elif signature != seen.signature:  # changed with no event telling us: wait for it to settle
                seen.signature, seen.since, seen.closed = signature, now, False
                waiting.append(path)
            elif signature is not None and signature[0] == 0 and is_placeholder(path):  # a download under way
                seen.recheck = now + max(PLACEHOLDER_RECHECK_SECONDS, self.settle_seconds * TEMPORARY_FACTOR)
                waiting.append(path)
            else:
                ready.append(path)
                del self._seen[path]
        for path in waiting:
            self._schedule(path, self._seen[path])
        return ready

    def next_deadline(self) -> float | None:
        """Seconds until the next file could be due, for the worker's wait."""
        while self._heap and not self._current(self._heap[0]):
            heapq.heappop(self._heap)
        return max(0.0, self._heap[0][0] - time.monotonic()) if self._heap else None
