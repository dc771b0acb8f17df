"""Immutable file events: the only thing watchdog handlers and scans hand to the pipeline."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class EventKind(enum.Enum):
    CREATED = "created"
    MODIFIED = "modified"
    CLOSED = "closed"
    DELETED = "deleted"
    MOVED = "moved"
    SCANNED = "scanned"


@dataclass(frozen=True)
class FileEvent:
    """Something happened to `path` (for MOVED, `dest` is the new path, and `path == dest` for a folder
    renamed in from outside the watched folders)."""

    kind: EventKind
    path: Path
    dest: Path | None = None
