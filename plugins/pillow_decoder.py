"""Default decoder: Pillow detects the format from content (JPEG, PNG, GIF, BMP, WebP, TIFF, ...), applies EXIF
orientation, flattens alpha on white, converts any mode (CMYK, 16-bit, greyscale, palette) to 8-bit RGB, and
refuses decompression bombs before allocating them. Whatever Pillow raises on damaged content becomes an
`ImageRejected`, so no input can fail more than its own file."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.hookspecs import hookimpl
from daemon.images import ImageRejected

_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _open(data: bytes, size: tuple[int, int], max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    if image.width * image.height > max_pixels:
        raise ImageRejected(
            "too_large", f"{image.width}x{image.height} pixels is above watch.max_image_pixels={max_pixels}")
    image.draft("RGB", size)  # JPEG: libjpeg decodes at a reduced scale, far cheaper for big photos
    image.load()
    return image


def _full_scale(mode: str, peak: float) -> float:
    """The value that means white: 65535 for 16-bit data, 1.0 for float data in [0, 1], else the peak."""
    if mode.startswith("I;16") or (mode == "I" and peak <= 65535):
        return 65535.0
    if mode == "F" and peak <= 1.0:
        return 1.0
    return max(peak, 1.0)


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES:
        array = np.asarray(image, dtype=np.float64)
        scaled = np.clip(array / _full_scale(image.mode, float(array.max(initial=0.0))), 0.0, 1.0) * 255.0
        image = Image.fromarray(np.round(scaled).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@hookimpl(trylast=True)
def retraind_decode_image(data: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    try:
        rgb = _to_rgb(_open(data, size, max_pixels)).resize(size, Image.Resampling.BILINEAR)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_large", f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("unsupported", "not an image format Pillow can read") from exc
    except Exception as exc:  # damaged data makes Pillow raise almost anything (struct.error, IndexError...)
        raise ImageRejected("corrupt", f"image data is damaged: {type(exc).__name__}: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)
