"""Reading image files safely: every failure becomes an `ImageRejected` with a short reason for metrics."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The decoder hook's shape: (encoded bytes, (width, height), max pixels) → uint8 RGB, or None for "not mine".
Decoder = Callable[[bytes, tuple[int, int], int], "np.ndarray | None"]


class ImageRejected(Exception):
    """The content cannot be used as an image. `reason` is a metric label, the message is for a person."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageFile:
    """The bytes of a file read in one go, with the content hash that keys its bottleneck."""

    path: Path
    data: bytes
    sha256: str


def read_image_file(path: Path, max_bytes: int) -> ImageFile:
    """Read a regular file (symlinks are followed once, loops and specials rejected) and hash its bytes."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot stat {path}: {exc.strerror or exc}") from exc
    if not os.path.isfile(path):
        raise ImageRejected("unsupported", f"{path} is not a regular file")
    check_size(path, st.st_size, max_bytes)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
    return ImageFile(path, data, hashlib.sha256(data).hexdigest())


def check_size(path: object, size: int, max_bytes: int) -> None:
    """The daemon's size limits, before a byte is read: empty files and files above `watch.max_file_bytes`."""
    if size == 0:
        raise ImageRejected("empty", f"{path} is empty (0 bytes)")
    if size > max_bytes:
        raise ImageRejected("too_large", f"{path} is {size} bytes, above watch.max_file_bytes={max_bytes}")


def decode_or_reject(decode: Decoder, data: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """`decode` (the decoder hook) as uint8 pixels of `size` (width, height); raises `ImageRejected`, also when
    no decoder plugin took the content."""
    image = decode(data, size, max_pixels)
    if image is None:
        raise ImageRejected("unsupported", "no decoder plugin could read this content")
    return image
