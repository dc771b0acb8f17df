"""Reading image files safely: every failure becomes an `ImageRejected` with a short reason for metrics, and
only an allow-list of image formats is ever parsed."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

#: Every reason a file can be rejected for (a `retraind_rejected_files_total` series each, exported at 0).
REJECT_REASONS = ("empty", "corrupt", "unsupported", "too_large", "unreadable")

#: The formats Pillow may parse (by content, whatever the name). Nothing else is opened: Pillow knows ~40
#: formats, some of them run external programs (EPS runs Ghostscript) or are rarely-exercised parsers. MPO
#: (camera JPEGs with a second picture) is opened by the JPEG entry; HEIF by pillow-heif, registered here.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "AVIF", "HEIF")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG chunks that hold text (XMP, comments, ImageMagick's raw profiles) and never pixels
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")

#: The decoder hook's shape: (encoded bytes, (width, height), max pixels, preprocessing version) → uint8 RGB, or
#: None for "not mine".
Decoder = Callable[[bytes, tuple[int, int], int, str], "np.ndarray | None"]


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
    """Read a regular file (symlinks are followed once, loops and specials rejected) and hash its bytes.

    The file is opened once, without blocking (a FIFO put in its place never stalls the reader), judged by the
    open file's own status, and read to at most `max_bytes`: a file that grows after it was judged, or a name
    swapped meanwhile for a link to a device, is refused (`too_large`, `unsupported`), never read whole.
    Raises `ImageRejected` ("unreadable", "unsupported", "empty", "too_large")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageRejected("unsupported", folder_link_message(path) if path.is_symlink() else
                                f"{path} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageRejected("unsupported", f"{path} is not a regular file")
        check_size(path, st.st_size, max_bytes)
        data = _read_at_most(fd, max_bytes + 1, st.st_size + 1)
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    check_size(path, len(data), max_bytes)  # it grew (or shrank to nothing) after it was judged
    return ImageFile(path, data, hashlib.sha256(data).hexdigest())


def _read_at_most(fd: int, limit: int, step: int) -> bytes:
    """Up to `limit` bytes from `fd`, fewer only at its end, asked for `step` bytes at a time (the size the file
    had plus one: a file read whole in one `os.read`, without a buffer of `limit` bytes each time)."""
    chunks: list[bytes] = []
    while limit > 0 and (chunk := os.read(fd, min(limit, step))):
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def folder_link_message(path: Path) -> str:
    """What to tell a person about `path`, a symbolic link to a folder found where files are expected (the
    walks do not follow such links: the inbox would move the files out of the linked folder)."""
    return (f"{path} is a link to the folder {os.path.realpath(path)}; links to folders are not followed; move "
            "or copy the folder here instead")


@functools.cache
def _register_heif() -> None:
    """pillow-heif's opener, registered once and explicitly (nothing is imported for its side effects)."""
    from pillow_heif import register_heif_opener

    register_heif_opener(thumbnails=False)


def png_without_text(data: bytes) -> bytes:
    """PNG bytes with their text chunks left out; anything else unchanged.

    Metadata size is not pixel size: Pillow inflates every text chunk while opening a PNG and raises on one
    above 1 MiB (`PngImagePlugin.MAX_TEXT_CHUNK`), so a sound picture carrying a large XMP packet (Photoshop
    histories reach tens of MB) would be refused. Pillow has no switch to skip text without also accepting
    truncated pixels (`LOAD_TRUNCATED_IMAGES`), and retraind reads no PNG text, so the chunks are dropped
    before Pillow sees the file. A damaged chunk table is passed on as it is, for Pillow to judge."""
    if not data.startswith(_PNG_SIGNATURE):
        return data
    kept, position = [data[:8]], 8
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length
        if kind not in _PNG_TEXT_CHUNKS or end > len(data):
            kept.append(data[position:end])
        position = end
    kept.append(data[position:])
    return b"".join(kept)


def jpeg_without_exif(data: bytes) -> bytes:
    """JPEG bytes without their EXIF segments (APP1 `Exif`); anything else unchanged.

    Pillow parses a JPEG's EXIF while opening it (for its resolution) and a truncated or garbled EXIF block
    makes the whole open fail: the decoder tries again without it, so a camera picture is never refused for
    its metadata. Segments before the scan are walked by their length fields; the scan itself is copied."""
    if not data.startswith(b"\xff\xd8"):
        return data
    kept, position = [data[:2]], 2
    while position + 4 <= len(data) and data[position] == 0xFF and data[position + 1] != 0xDA:
        (length,) = struct.unpack_from(">H", data, position + 2)
        end = position + 2 + length
        if not (data[position + 1] == 0xE1 and data[position + 4 : position + 10] == b"Exif\0\0"):
            kept.append(data[position:end])
        position = end
    kept.append(data[position:])
    return b"".join(kept)


def open_image(data: bytes) -> Image.Image:
    """Open encoded image bytes with Pillow, trying only `IMAGE_FORMATS`; raises what `Image.open` raises
    (`PIL.UnidentifiedImageError` for content of any other format). Decoding happens later, on `load()`."""
    _register_heif()
    fp: IO[bytes] = io.BytesIO(png_without_text(data))
    return Image.open(fp, formats=IMAGE_FORMATS)
def check_size(path: object, size: int, max_bytes: int) -> None:
    """The daemon's size limits, before a byte is read: empty files and files above `watch.max_file_bytes`."""
    if size == 0:
        raise ImageRejected("empty", f"{path} is empty (0 bytes)")
    if size > max_bytes:
        raise ImageRejected("too_large", f"{path} is {size} bytes, above watch.max_file_bytes={max_bytes}")


def decode_or_reject(decode: Decoder, data: bytes, size: tuple[int, int], max_pixels: int,
                     preprocessing: str) -> np.ndarray:
    """`decode` (the decoder hook) as uint8 pixels of `size` (width, height) made by the `preprocessing` version;
    raises `ImageRejected`, also when no decoder plugin took the content ("empty" for no bytes at all: an
    HTTP body's `{"b64": ""}`; files are judged empty before they are read)."""
    if not data:
        raise ImageRejected("empty", "the image is empty (0 bytes)")
    image = decode(data, size, max_pixels, preprocessing)
    if image is None:
        raise ImageRejected("unsupported", "no decoder plugin could read this content")
    return image
