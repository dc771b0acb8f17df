"""Publishing files atomically: write to a temporary name in the target folder, fsync, then `os.replace`."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

TMP_PREFIX = ".retraind-tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def move_atomic(src: Path, dst: Path) -> None:
    """Move a file into place; across file systems it is copied to a temporary name first."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: another file system
            raise
        tmp = dst.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{dst.name}")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
        src.unlink()
    fsync_dir(dst.parent)


def free_name(folder: Path, name: str, tag: str) -> Path:
    """`folder/name`, or `folder/<stem>-<tag><suffix>` when a different file already has that name."""
    candidate = folder / name
    if not candidate.exists():
        return candidate
    stem, suffix = os.path.splitext(name)
    return folder / f"{stem}-{tag}{suffix}"
