"""Default decoder: Pillow detects the format from content among an allow-list (JPEG, PNG, GIF, BMP, WebP,
TIFF, AVIF, HEIF; see `daemon.images.IMAGE_FORMATS`), applies EXIF orientation, flattens any transparency on
white, converts any mode (CMYK, 16-bit, greyscale, palette) to 8-bit RGB, and refuses decompression bombs
before allocating them. Metadata is never a reason to refuse pixels: text chunks are skipped and a malformed
EXIF block only loses its orientation. Whatever Pillow raises on damaged content becomes an `ImageRejected`,
so no input can fail more than its own file.

Resizing to the backbone's input, by preprocessing version (`daemon.backbone.PREPROCESSING`): v1 resizes every
picture with Pillow's BILINEAR filter. v2 enlarges a picture no larger than the input on either side with OpenCV's
bilinear `cv2.resize` (INTER_LINEAR; within 1 level of Pillow's BILINEAR, 4-5x cheaper: Pillow's resampling is
scalar C) and reduces anything larger with Pillow's antialiased BILINEAR (OpenCV's INTER_LINEAR does not
antialias when reducing). OpenCV is imported when a first enlargement needs it, not before: a daemon that
never enlarges (phone photos, a start that trains on stored bottlenecks) never holds its ~35 MiB."""

from __future__ import annotations

import functools
import logging
import re
import warnings
from types import ModuleType

import numpy as np
from PIL import Image, UnidentifiedImageError

from daemon.hookspecs import hookimpl
from daemon.images import IMAGE_FORMATS, ImageRejected, jpeg_without_exif, open_image

log = logging.getLogger(__name__)

_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_ORIENTATION = 0x0112
#: EXIF orientation -> the transpose that displays the picture upright (EXIF 2.3, tag 274)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
            7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_WHITE = (255, 255, 255, 255)


def _open(data: bytes, size: tuple[int, int], max_pixels: int) -> Image.Image:
    """Open and decode; a JPEG that fails is tried once more without its EXIF block (metadata only)."""
    try:
        return _load(data, size, max_pixels)
    except (ImageRejected, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as exc:
        bare = jpeg_without_exif(data)
        if len(bare) == len(data):
            raise
        log.debug("opening failed with the EXIF block (%s: %s); trying without it", type(exc).__name__, exc)
        return _load(bare, size, max_pixels)


def _load(data: bytes, size: tuple[int, int], max_pixels: int) -> Image.Image:
    # Pillow's own bomb check (a warning above its global limit, an error above twice that; also inside GIF
    # frames) follows watch.max_image_pixels: left at its 89,478,485 default, it refused pictures a higher
    # setting allows. Every caller passes the same configured value, so the assignment does not flip-flop.
    if Image.MAX_IMAGE_PIXELS != max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = open_image(data)
    if image.width * image.height > max_pixels:
        raise ImageRejected(
            "too_large", f"{image.width}x{image.height} pixels is above watch.max_image_pixels={max_pixels}")
    image.draft("RGB", size)  # JPEG: libjpeg decodes at a reduced scale, far cheaper for big photos
    image.load()
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 when absent). Only this one tag is read: any other tag may be malformed (a
    rational with a zero denominator, a wrong type) without costing the picture, and an unreadable EXIF
    block only loses its orientation."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001 - a damaged EXIF block raises almost anything
        log.debug("EXIF block unreadable (%s: %s); orientation not applied", type(exc).__name__, exc)
        return 1
    if value not in _UPRIGHT and value != 1:
        log.debug("EXIF orientation %r is not 1-8; ignored", value)
        return 1
    return int(value)


def _upright(image: Image.Image) -> Image.Image:
    method = _UPRIGHT.get(_orientation(image))
    return image if method is None else image.transpose(method)


def _full_scale(mode: str, peak: float) -> float:
    """The value that means white: 65535 for 16-bit data, 1.0 for float data in [0, 1], else the peak."""
    if mode.startswith("I;16") or (mode == "I" and peak <= 65535):
        return 65535.0
    if mode == "F" and peak <= 1.0:
        return 1.0
    return max(peak, 1.0)


def _narrow(image: Image.Image) -> Image.Image:
    """16-bit and float greys as 8-bit, keeping their brightness; a transparent colour key becomes an alpha
    channel first (Pillow's own conversion would clip the values and drop the key)."""
    array = np.asarray(image, dtype=np.float64)
    scaled = np.clip(array / _full_scale(image.mode, float(array.max(initial=0.0))), 0.0, 1.0) * 255.0
    grey = Image.fromarray(np.round(scaled).astype(np.uint8))
    key = image.info.get("transparency")
    if not isinstance(key, (int, float)):
        return grey
    alpha = Image.fromarray(np.where(array == key, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


def _flatten(image: Image.Image) -> Image.Image:
    """RGB with any transparency (an alpha channel, a palette's or a colour key's tRNS, in any mode) laid on
    one white background, so one picture gives one array whatever way its transparency was stored."""
    if image.mode in _WIDE_MODES:
        image = _narrow(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # no copy of what is already RGB


#: The preprocessing versions this decoder makes (`daemon.backbone.PREPROCESSING`)
VERSIONS = ("v1", "v2")


@functools.cache
def _cv2() -> ModuleType:
    """OpenCV, imported at its first use. Its own worker pool stays off: the decoding threads (the HTTP pool, the
    extractor's pools) are the parallelism, and more threads would only compete with the engine for the cores."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def _resized(image: Image.Image, size: tuple[int, int], preprocessing: str) -> np.ndarray:
    """8-bit RGB `image` as uint8 pixels of `size` (width, height), shape (height, width, 3): in v2 enlarged by
    OpenCV's bilinear filter when no side is reduced; else (and in v1) by Pillow's (antialiased) bilinear filter."""
    if preprocessing != "v1" and image.width <= size[0] and image.height <= size[1]:
        cv2 = _cv2()
        return cv2.resize(np.asarray(image), size, interpolation=cv2.INTER_LINEAR)  # type: ignore[no-any-return]
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


@hookimpl
def retraind_preprocessing_versions() -> list[str]:
    return list(VERSIONS)


def _bomb_message(exc: Exception, max_pixels: int) -> str:
    """Pillow's bomb error without its own figure: above twice its limit it says `exceeds limit of 178956970
    pixels`, a number no setting has; the pixels it counted and the configured limit are what a user needs."""
    counted = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{counted.group(1)} pixels" if counted else "too many pixels"
    return f"decompression bomb: {pixels}, above watch.max_image_pixels={max_pixels}"


@hookimpl(trylast=True)
def retraind_decode_image(data: bytes, size: tuple[int, int], max_pixels: int, preprocessing: str) -> np.ndarray | None:
    if preprocessing not in VERSIONS:
        return None
    try:
        return _resized(_flatten(_upright(_open(data, size, max_pixels))), size, preprocessing)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_large", _bomb_message(exc, max_pixels)) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("unsupported", f"not an image in a format retraind reads ({', '.join(IMAGE_FORMATS)})") from exc
    except Exception as exc:  # damaged data makes Pillow raise almost anything (struct.error, IndexError...)
        raise ImageRejected("corrupt", f"image data is damaged: {type(exc).__name__}: {exc}") from exc
