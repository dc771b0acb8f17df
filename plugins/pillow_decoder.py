"""Default decoder: Pillow detects the format from content (JPEG, PNG, GIF, BMP, WebP, TIFF, ...), applies EXIF
orientation, flattens alpha on white, converts any mode (CMYK, 16-bit, greyscale, palette) to 8-bit RGB, and
refuses decompression bombs before allocating them."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.hookspecs import hookimpl
from daemon.images import ImageRejected


def _open(data: bytes, size: tuple[int, int], max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageRejected(
                    "too_large",
                    f"{image.width}x{image.height} pixels is above watch.max_image_pixels={max_pixels}",
                )
            image.draft("RGB", size)  # JPEG: libjpeg decodes at a reduced scale, far cheaper for big photos
            image.load()
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_large", f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("unsupported", "not an image format Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("corrupt", f"image data is damaged: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@hookimpl(trylast=True)
def retraind_decode_image(data: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    image = _open(data, size, max_pixels)
    rgb = _to_rgb(image).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
