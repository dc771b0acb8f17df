"""Where to draw the review queue's near-duplicate line: cosine similarity of EfficientNet-Lite0 bottlenecks
between an image and its near-duplicates (re-encoded as JPEG quality 60, half size, 5% cropped off each
side) versus between different images, on ../shared/data/tuxpaint6. `daemon.review.NEAR_DUPLICATE_COSINE`
must sit above the second and below most of the first.

Prints one line per measurement. Usage: python bench/near_duplicates.py [--images 40] [--data DIR]"""

from __future__ import annotations

import argparse
import io
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from daemon.app import build_backbone
from daemon.backbone import preprocessing_of
from daemon.config import parse_config
from daemon.metrics import Metrics
from daemon.plugin_manager import Hooks, make_plugin_manager
from daemon.review import NEAR_DUPLICATE_COSINE

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tuxpaint6"
_VARIANTS: dict[str, Callable[[Image.Image], tuple[Image.Image, str]]] = {
    "jpeg q60": lambda im: (im, "JPEG"),
    "half size": lambda im: (im.resize((im.width // 2, im.height // 2)), "PNG"),
    "5% crop": lambda im: (im.crop((im.width // 20, im.height // 20, im.width - im.width // 20,
                                    im.height - im.height // 20)), "PNG"),
}


def _encoded(path: Path, variant: str) -> bytes:
    with Image.open(path) as opened:
        image, fmt = _VARIANTS[variant](opened.convert("RGB"))
        buffer = io.BytesIO()
        image.save(buffer, fmt, **({"quality": 60} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    config = parse_config({"data_root": str(root)}, root)
    hooks = Hooks(make_plugin_manager(config.plugins.disable, ()), Metrics())
    backbone = build_backbone(hooks, config)
    files = sorted(p for p in args.data.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    files = random.Random(0).sample(files, min(args.images, len(files)))

    def unit(payloads: list[bytes]) -> np.ndarray:
        images = [hooks.decode_image(data, backbone.input_size, config.watch.max_image_pixels,
                                     preprocessing_of(backbone.id)) for data in payloads]
        vectors = backbone.embed(np.stack(images))
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # type: ignore[no-any-return]

    originals = unit([f.read_bytes() for f in files])
    print(f"{len(files)} images of {args.data}; threshold in daemon/review.py: {NEAR_DUPLICATE_COSINE}")
    for variant in _VARIANTS:
        similarity = (originals * unit([_encoded(f, variant) for f in files])).sum(axis=1)
        grouped = float(np.mean(similarity >= NEAR_DUPLICATE_COSINE))
        print(f"near-duplicate ({variant}): cosine min {similarity.min():.3f}, median {np.median(similarity):.3f}; "
              f"grouped at the threshold {grouped:.0%}")
    labels = np.array([f.parent.name for f in files])
    pairs = originals @ originals.T
    same = pairs[(labels[:, None] == labels[None, :]) & ~np.eye(len(files), dtype=bool)]
    other = pairs[labels[:, None] != labels[None, :]]
    print(f"different images, same label: cosine max {same.max():.3f}, median {np.median(same):.3f}; "
          f"other labels: max {other.max():.3f} (grouped at the threshold: "
          f"{float(np.mean(np.concatenate([same, other]) >= NEAR_DUPLICATE_COSINE)):.1%})")


if __name__ == "__main__":
    main()
