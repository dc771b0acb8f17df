"""Resizing to the backbone's input in the shipped decoder (`plugins.pillow_decoder`): pictures are enlarged
by OpenCV's bilinear filter (cheaper than Pillow's) and reduced by Pillow's antialiased one; each test makes its
picture here, lossless (PNG), so only the resize is compared."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from plugins.pillow_decoder import retraind_decode_image


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pillow_bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)).astype(int)


def test_an_enlarged_picture_is_within_one_level_of_pillows_bilinear_filter() -> None:
    noise = np.random.default_rng(5).integers(0, 256, (29, 37, 3), dtype=np.uint8)  # height 29, width 37
    for size in ((64, 48), (37, 29), (37, 80)):  # both sides enlarged; the same size; one side kept
        out = retraind_decode_image(png(noise), size, 10**8)
        assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - pillow_bilinear(noise, size)).max() <= 1, size


def test_a_reduced_picture_is_antialiased_on_any_reduced_side() -> None:
    """One-pixel black and white stripes reduced 3x must come out an even grey (an antialiasing filter averages
    them); a filter that only samples (OpenCV's INTER_LINEAR when reducing) gives stripes of 0 and 255."""
    stripes = np.zeros((96, 96, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    for source, size in ((stripes, (32, 32)), (stripes[:16], (32, 32))):  # reduced both ways; width only
        out = retraind_decode_image(png(np.ascontiguousarray(source)), size, 10**8).astype(int)
        assert np.array_equal(out, pillow_bilinear(np.ascontiguousarray(source), size)), size
        assert 100 <= out.min() and out.max() <= 155, (size, out.min(), out.max())
