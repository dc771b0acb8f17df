"""Resizing to the backbone's input in the shipped decoder (`plugins.pillow_decoder`), by preprocessing version:
v2 enlarges by OpenCV's bilinear filter (cheaper than Pillow's) and reduces by Pillow's antialiased one, v1
resizes everything with Pillow's; each test makes its picture here, lossless (PNG), so only the resize is
compared."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from plugins.pillow_decoder import retraind_decode_image

REPO = Path(__file__).resolve().parents[1]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pillow_bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)).astype(int)


NOISE = np.random.default_rng(5).integers(0, 256, (29, 37, 3), dtype=np.uint8)  # height 29, width 37


def test_an_enlarged_picture_is_within_one_level_of_pillows_bilinear_filter() -> None:
    for size in ((64, 48), (37, 29), (37, 80)):  # both sides enlarged; the same size; one side kept
        out = retraind_decode_image(png(NOISE), size, 10**8, "v2")
        assert out is not None and out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - pillow_bilinear(NOISE, size)).max() <= 1, size


def test_v1_is_pillows_bilinear_filter_exactly_and_differs_from_v2() -> None:
    """A model trained on v1 is served with v1's own pixels during a migration (daemon/migration.py)."""
    v1 = retraind_decode_image(png(NOISE), (64, 48), 10**8, "v1")
    v2 = retraind_decode_image(png(NOISE), (64, 48), 10**8, "v2")
    assert v1 is not None and v2 is not None
    assert np.array_equal(v1, pillow_bilinear(NOISE, (64, 48))) and not np.array_equal(v1, v2)
    assert retraind_decode_image(png(NOISE), (64, 48), 10**8, "v7") is None  # not a version it makes


def test_a_reduced_picture_is_antialiased_on_any_reduced_side() -> None:
    """One-pixel black and white stripes reduced 3x must come out an even grey (an antialiasing filter averages
    them); a filter that only samples (OpenCV's INTER_LINEAR when reducing) gives stripes of 0 and 255."""
    stripes = np.zeros((96, 96, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    for source, size in ((stripes, (32, 32)), (stripes[:16], (32, 32))):  # reduced both ways; width only
        out = retraind_decode_image(png(np.ascontiguousarray(source)), size, 10**8, "v2")
        assert out is not None
        assert np.array_equal(out.astype(int), pillow_bilinear(np.ascontiguousarray(source), size)), size
        assert 100 <= out.min() and out.max() <= 155, (size, out.min(), out.max())


def test_opencv_is_imported_only_when_a_picture_is_enlarged() -> None:
    """Its ~35 MiB are resident once imported: a daemon that only reduces (or trains on stored bottlenecks)
    never holds them."""
    script = """
import sys
import numpy as np
from plugins.pillow_decoder import retraind_decode_image
from tests.test_resizing import png
big = png(np.zeros((64, 64, 3), dtype=np.uint8))
seen = ['cv2' in sys.modules]
retraind_decode_image(big, (32, 32), 10**8, "v2")
seen.append('cv2' in sys.modules)
retraind_decode_image(big, (96, 96), 10**8, "v2")
seen.append('cv2' in sys.modules)
print(seen)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[False, False, True]"
