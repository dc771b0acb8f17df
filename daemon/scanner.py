"""Reconcile scans: what appeared, changed or vanished while no event told us (start-up, overflow, timer)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from daemon.events import EventKind, FileEvent
from daemon.store import Store


def walk_files(root: Path) -> Iterator[Path]:
    """Every non-directory entry below `root` (symlinks included, not followed into)."""
    for folder, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            yield Path(folder) / name


def scan_classes(root: Path, store: Store, backbone: str) -> Iterator[FileEvent]:
    """Files whose size or mtime differ from the catalog or that lack a vector for `backbone`, and catalog
    entries whose file is gone. A generator: the pipeline takes a slice of it per turn, so a scan of a large
    tree never holds up inbox files. The catalog is read once, as it was when the scan began."""
    known = store.catalog_signatures()
    for rel in store.paths_missing_bottleneck(backbone):
        known.pop(rel, None)
    for path in walk_files(root):
        signature = known.pop(path.relative_to(root).as_posix(), None)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if signature is None or st is None or signature != (st.st_size, st.st_mtime_ns):
            yield FileEvent(EventKind.SCANNED, path)
    for rel in known:
        yield FileEvent(EventKind.DELETED, root / rel)


def scan_inbox(root: Path) -> Iterator[FileEvent]:
    return (FileEvent(EventKind.SCANNED, path) for path in walk_files(root))
