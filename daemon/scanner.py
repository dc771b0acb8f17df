"""Reconcile scans: what appeared, changed or vanished while no event told us (start-up, overflow, timer)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from daemon.events import EventKind, FileEvent
from daemon.store import Store, file_signature


def _nothing(name: str) -> bool:
    return False


def walk_files(root: Path, ignored: Callable[[str], bool] = _nothing) -> Iterator[Path]:
    """Every non-directory entry below `root` (symlinks included, not followed into) whose name, and the names
    of the folders above it, are not `ignored`; ignored folders are not entered at all, so a NAS's thousands of
    thumbnails cost nothing."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not ignored(d)]
        for name in files:
            if not ignored(name):
                yield Path(folder) / name


def scan_classes(root: Path, store: Store, backbone: str, ignored: Callable[[str], bool]) -> list[FileEvent]:
    """Files whose size, mtime, ctime or inode differ from the catalog (`file_signature`) or that lack a vector
    for `backbone`, and catalog entries whose file is gone (or is now `ignored`). One stat per file, as before
    the ctime counted."""
    catalog = store.catalog()
    for rel in store.paths_missing_bottleneck(backbone):
        catalog.pop(rel, None)
    events: list[FileEvent] = []
    for path in walk_files(root, ignored):
        known = catalog.pop(path.relative_to(root).as_posix(), None)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if known is None or st is None or known.signature != file_signature(st):
            events.append(FileEvent(EventKind.SCANNED, path))
    events.extend(FileEvent(EventKind.DELETED, root / rel) for rel in catalog)
    return events


def scan_inbox(root: Path, ignored: Callable[[str], bool]) -> list[FileEvent]:
    return [FileEvent(EventKind.SCANNED, path) for path in walk_files(root, ignored)]
