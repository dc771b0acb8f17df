"""What `retraind bulk` reads: the image files below folders or any URI pyarrow's file systems understand
(`s3://`, `gs://`, `hdfs://`, `file://`, a plain local path), listed once on the driver with their labels.

A file's label is its top folder below the SRC it was found under (the daemon's `classes/<label>/` rule); a
file lying directly in SRC, or given itself as SRC, has none. Reading happens on the workers, one file at a
time, so an unreadable file fails alone: it becomes an `ImageRejected`, never an exception out of a batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.images import ImageRejected, check_size
from daemon.indexer import label_of


class SourceError(Exception):
    """A SRC argument cannot be listed (missing, no such bucket, no file system for its scheme)."""


@dataclass(frozen=True)
class SourceFile:
    """One listed file: `root` is the SRC its file system is opened from (on each worker), `path` the file
    inside that file system, `shown` how results name it (a local path, or a URI), `size` in bytes."""

    root: str
    path: str
    shown: str
    label: str | None
    size: int


def open_source(src: str) -> tuple[Any, str]:
    """`src` as (pyarrow file system, path inside it); a local path is made absolute."""
    from pyarrow import fs

    if "://" not in src:
        return fs.LocalFileSystem(), str(Path(src).resolve())
    try:
        system, path = fs.FileSystem.from_uri(src)
    except (OSError, ValueError) as exc:  # an unknown scheme, a bucket without credentials...
        raise SourceError(f"{src}: cannot open its file system: {exc}") from exc
    return system, str(path)


def _shown(src: str, root: str, path: str) -> str:
    if "://" not in src:
        return path
    return src.rstrip("/") + path[len(root.rstrip("/")):]


def list_sources(sources: Iterable[str], accept: Callable[[Path], bool]) -> list[SourceFile]:
    """Every file below each of `sources` that `accept` takes (given its path relative to the SRC), sorted by
    name within each SRC; raises `SourceError` for a SRC that does not exist."""
    from pyarrow import fs

    found: list[SourceFile] = []
    for src in sources:
        system, root = open_source(src)
        try:
            top = system.get_file_info(root)
            if top.type == fs.FileType.NotFound:
                raise SourceError(f"{src}: no such file or folder")
            infos = [top] if top.type == fs.FileType.File else system.get_file_info(
                fs.FileSelector(root, recursive=True))
        except OSError as exc:
            raise SourceError(f"{src}: cannot list it: {exc}") from exc
        for info in sorted((i for i in infos if i.type == fs.FileType.File), key=lambda i: i.path):
            parts = Path(info.path).relative_to(root).parts if info.path != root else ()
            if parts and not accept(Path(*parts)):
                continue
            label = label_of(parts[0]) if len(parts) >= 2 else None
            found.append(SourceFile(src, info.path, _shown(src, root, info.path), label, int(info.size or 0)))
    return found


class SourceReader:
    """Reads listed files on a worker (file systems opened once per SRC), with the daemon's size limit."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._systems: dict[str, Any] = {}

    def read(self, root: str, path: str, shown: str, size: int) -> tuple[bytes, str]:
        """The file's bytes and their sha256 (hex); raises `ImageRejected`."""
        check_size(shown, size, self._max_bytes)
        if root not in self._systems:
            self._systems[root] = open_source(root)[0]
        try:
            with self._systems[root].open_input_stream(path) as stream:
                data = bytes(stream.read(self._max_bytes + 1))  # never past the limit, whatever the file became
        except OSError as exc:
            raise ImageRejected("unreadable", f"cannot read {shown}: {exc}") from exc
        check_size(shown, len(data), self._max_bytes)  # it may have changed since it was listed
        return data, hashlib.sha256(data).hexdigest()
