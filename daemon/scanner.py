"""Reconcile scans: what appeared, changed or vanished while no event told us (start-up, overflow, timer)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from daemon.events import EventKind, FileEvent
from daemon.store import Store, file_signature


def walk_files(root: Path) -> Iterator[Path]:
    """Every non-directory entry below `root` (symlinks included, not followed into)."""
    for folder, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            yield Path(folder) / name


def scan_classes(root: Path, store: Store, backbone: str) -> list[FileEvent]:
    """Files whose size, mtime, ctime or inode differ from the catalog (`file_signature`) or that lack a vector
    for `backbone`, and catalog entries whose file is gone. One stat per file, as before the ctime counted."""
    catalog = store.catalog()
    for rel in store.paths_missing_bottleneck(backbone):
        catalog.pop(rel, None)
    events: list[FileEvent] = []
    for path in walk_files(root):
        known = catalog.pop(path.relative_to(root).as_posix(), None)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if known is None or st is None or known.signature != file_signature(st):
            events.append(FileEvent(EventKind.SCANNED, path))
    events.extend(FileEvent(EventKind.DELETED, root / rel) for rel in catalog)
    return events


def scan_inbox(root: Path) -> list[FileEvent]:
    return [FileEvent(EventKind.SCANNED, path) for path in walk_files(root)]
