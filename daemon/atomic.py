"""Publishing files atomically: write to a temporary name in the target folder, fsync, then `os.replace`."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Collection
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


def fsync_tree(folder: Path) -> None:
    """Make every file below `folder` durable before a rename makes it visible."""
    for item in folder.rglob("*"):
        if item.is_file() and not item.is_symlink():
            _fsync(item)
    fsync_dir(folder)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old file or the whole new one, never a part."""
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        _fsync(tmp)

    _place(path, write)
    fsync_dir(path.parent)


def _copy(src: Path, tmp: Path) -> None:
    shutil.copy2(src, tmp, follow_symlinks=False)
    if not os.path.islink(tmp):
        _fsync(tmp)


def move_atomic(src: Path, dst: Path) -> None:
    """Move a file into place; across file systems it is copied to a temporary name first. A relative
    symlink is first re-pointed where it lies (atomically), so that it reaches the same file from anywhere."""
    if os.path.islink(src) and not os.path.isabs(target := os.readlink(src)):
        absolute = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(src)), target))
        _place(src, lambda tmp: os.symlink(absolute, tmp))
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # another file system: copy, then remove the original
            raise
        _place(dst, lambda tmp: _copy(src, tmp))
        src.unlink()
    fsync_dir(dst.parent)


def _place(dst: Path, make: Callable[[Path], object]) -> None:
    """Make a temporary entry beside `dst` and rename it into place; no partial entry is left behind. The
    temporary name is 46 bytes whatever `dst` is called, so any name the file system takes can be published."""
    tmp = dst.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}")
    try:
        make(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


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


def free_name(folder: Path, name: str, tag: str, room: int = RECORD_ROOM, taken: Collection[Path] = ()) -> Path:
    """`folder/name`, or `folder/<stem>-<tag>[-n]<suffix>` when another entry already has that name (or it is
    in `taken`: names given to a batch's files not moved yet) or when the name would not leave `room` bytes of
    the folder's NAME_MAX for a record's suffix (its stem is then cut to fit)."""
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
