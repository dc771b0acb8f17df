"""Publishing files atomically: write to a temporary name in the target folder, fsync, then `os.replace`.

A batch of such writes can be made durable together (`GroupCommit`): each fsync costs a commit of the file
system's journal (8-16 ms per inbox file on this project's shared disk for its four fsyncs); one pass over a
batch's files and folders at the end costs a fraction of that.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".retraind-tmp-"
#: Bytes a published file's name leaves free for the longest record suffix written beside it (`.error.json`)
RECORD_ROOM = len(".error.json")
_SUFFIX_BYTES = 16  # a longer "extension" is part of the name, not a file type


def _fsync(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    _fsync(path, os.O_DIRECTORY)


_deferring = threading.local()


class GroupCommit:
    """Durability for a batch of writes at once. Inside `deferring()`, `write_atomic`, `move_atomic` and
    `sync_file` on this thread publish at once but only note what must reach the disk; `commit()` then fsyncs
    each noted file and then each noted folder, once each. Until `commit()` returns, a power cut may lose any
    of those writes or leave a noted file empty (a killed process loses none: they are in the page cache), so
    the caller must keep what redoes them until then: the inbox journal closes its entries only after."""

    def __init__(self) -> None:
        self._files: dict[Path, None] = {}
        self._folders: dict[Path, None] = {}

    @contextmanager
    def deferring(self) -> Iterator[GroupCommit]:
        """Defer this thread's fsyncs to `commit()` while the block runs."""
        outer = getattr(_deferring, "group", None)
        _deferring.group = self
        try:
            yield self
        finally:
            _deferring.group = outer

    def commit(self) -> None:
        """fsync the noted files, then their folders; raises OSError (the noted writes stay noted). A file
        removed meanwhile has nothing left to keep."""
        for path in self._files:
            try:
                _fsync(path)
            except FileNotFoundError:
                pass
        for folder in self._folders:
            fsync_dir(folder)
        self._files.clear()
        self._folders.clear()


def _group() -> GroupCommit | None:
    group: GroupCommit | None = getattr(_deferring, "group", None)
    return group


def sync_file(path: Path) -> None:
    """fsync `path` now, or at the commit of the group this thread defers to."""
    if (group := _group()) is None:
        _fsync(path)
    else:
        group._files[path] = None


def _sync_folder(path: Path) -> None:
    if (group := _group()) is None:
        fsync_dir(path)
    else:
        group._folders[path] = None


def fsync_tree(folder: Path) -> None:
    """Make every file below `folder` durable before a rename makes it visible."""
    for item in folder.rglob("*"):
        if item.is_file() and not item.is_symlink():
            _fsync(item)
    fsync_dir(folder)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old file or the whole new one, never a part; durable
    when it returns, or at the commit of the group this thread defers to."""
    group = _group()

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        if group is None:
            _fsync(tmp)

    _place(path, write)
    if group is not None:
        group._files[path] = None
    _sync_folder(path.parent)


def _copy(src: Path, tmp: Path) -> None:
    shutil.copy2(src, tmp, follow_symlinks=False)
    if not os.path.islink(tmp):
        _fsync(tmp)


def move_atomic(src: Path, dst: Path) -> None:
    """Move a file into place; across file systems it is copied to a temporary name first, and the copy is
    removed again when the original cannot be (a read-only folder): a failed move leaves the file in one place.
    A relative symlink is first re-pointed where it lies (atomically), so that it reaches the same file from
    anywhere."""
    if os.path.islink(src) and not os.path.isabs(target := os.readlink(src)):
        absolute = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(src)), target))
        _place(src, lambda tmp: os.symlink(absolute, tmp))
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # another file system: copy, then remove the original
            raise
        _place(dst, lambda tmp: _copy(src, tmp))
        try:
            src.unlink()
        except BaseException:
            dst.unlink()
            raise
    _sync_folder(dst.parent)


def _place(dst: Path, make: Callable[[Path], object]) -> None:
    """Make a temporary entry beside `dst` and rename it into place; no partial entry is left behind. The
    temporary name is 46 bytes whatever `dst` is called, so any name the file system takes can be published."""
    tmp = dst.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}")
    try:
        make(tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):  # only a failure leaves one: a rename that succeeded took it
            tmp.unlink()
        raise


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that `folder`'s file system takes (NAME_MAX, 255 on Linux's)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _cut(raw: bytes, size: int) -> bytes:
    """At most `size` bytes of `raw`, never ending inside a UTF-8 character."""
    if len(raw) <= size:
        return raw
    size = max(size, 0)
    while size and (raw[size] & 0xC0) == 0x80:
        size -= 1
    return raw[:size]


def utf8_name(name: str) -> str:
    """`name` as the file system gave it (bytes that are not UTF-8 held as surrogate escapes, PEP 383) with each
    such byte replaced by U+FFFD, so that a JSON record, the catalog and a label can hold it; a name that is
    valid UTF-8 comes back unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def free_name(folder: Path, name: str, tag: str, room: int = RECORD_ROOM, taken: Collection[Path] = ()) -> Path:
    """`folder/name`, or `folder/<stem>-<tag>[-n]<suffix>` when another entry already has that name (or it is
    in `taken`: names given to a batch's files not moved yet) or when the name would not leave `room` bytes of
    the folder's NAME_MAX for a record's suffix (its stem is then cut to fit). Every name it gives is valid
    UTF-8 (`utf8_name`): a file filed or taught under a name that is not would be skipped for training and
    written into records that strict JSON readers refuse."""
    name = utf8_name(name)
    limit = name_max(folder) - room

    def free(candidate: Path) -> bool:
        return candidate not in taken and not os.path.lexists(candidate)

    if len(os.fsencode(name)) <= limit and free(folder / name):
        return folder / name
    stem, suffix = os.path.splitext(os.fsencode(name))
    if len(suffix) > _SUFFIX_BYTES:
        stem, suffix = stem + suffix, b""
    n = 1
    while True:
        tail = os.fsencode(f"-{tag}{f'-{n}' if n > 1 else ''}") + suffix
        candidate = folder / os.fsdecode(_cut(stem, limit - len(tail)) + tail)
        if free(candidate):
            return candidate
        n += 1
