"""Reconcile scans: what appeared, changed or vanished while no event told us (start-up, overflow, timer)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from daemon.events import EventKind, FileEvent
from daemon.indexer import label_problem
from daemon.store import Store, file_signature

log = logging.getLogger(__name__)

#: Folders already named as unlistable, with why: every periodic rescan meets them again (warned once each).
_unlisted: set[tuple[str, int | None]] = set()


def _nothing(name: str) -> bool:
    return False


def _unlistable(exc: OSError) -> None:
    """A folder the walk cannot list is named, once: its files would otherwise never be seen, without a word
    (os.walk skips such folders silently). One deleted while it is walked is no news."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) or (str(exc.filename), exc.errno) in _unlisted:
        return
    _unlisted.add((str(exc.filename), exc.errno))
    why = ("its path is longer than the system allows (PATH_MAX, 4096 bytes): move it higher up"
           if exc.errno == errno.ENAMETOOLONG else exc.strerror or str(exc))
    log.warning("cannot list the folder %s: %s; the files in it are not seen", exc.filename, why)


def walk_files(root: Path, ignored: Callable[[str], bool] = _nothing) -> Iterator[Path]:
    """Every non-directory entry below `root` (symlinks included, links to folders too, none followed into)
    whose name, and the names of the folders above it, are not `ignored`; ignored folders are not entered at
    all, so a NAS's thousands of thumbnails cost nothing. A folder that cannot be listed is warned about."""
    for folder, dirs, files in os.walk(root, onerror=_unlistable, followlinks=False):
        dirs[:] = [d for d in dirs if not ignored(d)]
        for name in dirs:
            if os.path.islink(os.path.join(folder, name)):  # os.walk lists a link to a folder as a folder
                yield Path(folder) / name
        for name in files:
            if not ignored(name):
                yield Path(folder) / name


def scan_classes(root: Path, store: Store, backbone: str, ignored: Callable[[str], bool]) -> Iterator[FileEvent]:
    """Files whose size, mtime, ctime or inode differ from the catalog (`file_signature`) or that lack a vector
    for `backbone`, and catalog entries whose file is gone (or is now `ignored`, or under a label folder whose
    name `label_problem` refuses: a store from before that rule). One stat per file. A
    generator: the pipeline takes a slice of it per turn, so a scan of a large tree never holds up inbox files.
    The catalog is read once, as it was when the scan began."""
    known = store.catalog_signatures()
    for rel in store.paths_missing_bottleneck(backbone):
        known.pop(rel, None)
    for rel in [rel for rel in known if label_problem(rel.split("/", 1)[0])]:  # stored before that rule
        del known[rel]
        yield FileEvent(EventKind.DELETED, root / rel)
    for path in walk_files(root, ignored):
        signature = known.pop(path.relative_to(root).as_posix(), None)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if signature is None or st is None or signature != file_signature(st):
            yield FileEvent(EventKind.SCANNED, path)
    for rel in known:
        yield FileEvent(EventKind.DELETED, root / rel)


def scan_inbox(root: Path, ignored: Callable[[str], bool]) -> Iterator[FileEvent]:
    return (FileEvent(EventKind.SCANNED, path) for path in walk_files(root, ignored))
