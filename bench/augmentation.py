"""What retrain.py's distortions are worth when cached: held-out accuracy and cost of each setting with
the default backbone (EfficientNet-Lite0, ImageNet weights) and the default L-BFGS head on
../shared/data/tuxpaint6.

Every image is a test image exactly once: retrain.py's stable name hash cuts the set into ten buckets, and
each of five folds tests on two buckets, validates (picks the L2 strength) on one and trains on the other
seven, so an accuracy pools one prediction per image. Variants are made with the daemon's own Augmenter and
distortion plugin; a fold adds the variants of its training images only. Random settings are repeated with
several `augmentation.seed`s (mean ± standard deviation, and the range); a mirror is not random: one run.

Usage: python bench/augmentation.py [--seeds 3] [--data DIR]"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.augment import Augmenter, variant_bottlenecks
from daemon.backbone import preprocessing_of
from daemon.config import AugmentationConfig, TrainingConfig, parse_config
from daemon.dataset import Dataset, Part
from daemon.engines import build_backbone
from daemon.extractor import Extractor
from daemon.images import ImageFile, read_image_file
from daemon.metrics import Metrics
from daemon.plugin_manager import Hooks, make_plugin_manager
from daemon.split import VALIDATION, split_of
from daemon.store import Store
from plugins.softmax_head import retraind_train_head

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tuxpaint6"
BATCH = 32


@dataclass(frozen=True)
class Setting:
    name: str
    distortions: dict[str, float | bool]
    variants: int


SETTINGS = (
    Setting("none", {}, 0),
    Setting("flip_left_right", {"flip_left_right": True}, 1),
    Setting("random_crop 10", {"random_crop": 10}, 2),
    Setting("random_scale 10", {"random_scale": 10}, 2),
    Setting("random_brightness 10", {"random_brightness": 10}, 2),
    Setting("all four at 10, 4 variants", {"flip_left_right": True, "random_crop": 10, "random_scale": 10,
                                           "random_brightness": 10}, 4),
    Setting("all four at 10", {"flip_left_right": True, "random_crop": 10, "random_scale": 10,
                               "random_brightness": 10}, 2),
    Setting("all four at 25", {"flip_left_right": True, "random_crop": 25, "random_scale": 25,
                               "random_brightness": 25}, 2),
)


def bucket(name: str) -> int:
    """Which tenth of retrain.py's hash range `name` falls in (the daemon's own split function, reused)."""
    return next(k for k in range(10) if split_of(name, 10.0 * (k + 1), 0.0) == VALIDATION)


@dataclass
class Images:
    files: list[ImageFile]
    y: np.ndarray
    buckets: np.ndarray
    labels: tuple[str, ...]
    originals: np.ndarray


def load(data: Path, extractor: Extractor) -> Images:
    labels = tuple(sorted(p.name for p in data.iterdir() if p.is_dir()))
    paths = [(i, p) for i, label in enumerate(labels) for p in sorted((data / label).iterdir())]
    files = [read_image_file(p, 1 << 26) for _, p in paths]
    started = time.perf_counter()
    vectors = extractor.extract(files).vectors
    print(f"{len(files)} images, {len(labels)} labels; original bottlenecks: "
          f"{len(files) / (time.perf_counter() - started):.1f} images/s")
    y, buckets = np.array([i for i, _ in paths]), np.array([bucket(p.name) for _, p in paths])
    return Images(files, y, buckets, labels, np.stack([vectors[f.sha256] for f in files]))


def make_variants(images: Images, augmenter: Augmenter, extractor: Extractor,
                  made_before: dict[str, tuple[np.ndarray, float]]) -> tuple[np.ndarray, float]:
    """(images, variants, dim) bottlenecks of every image, and the seconds each variant cost. The recipe
    leaves out the variant count, so fewer variants of a recipe made before are its first ones."""
    if augmenter.recipe in made_before:
        earlier, seconds = made_before[augmenter.recipe]
        return earlier[:, : augmenter.variants], seconds
    jobs = ((f.sha256, f.data, i) for f in images.files for i in range(augmenter.variants))
    started = time.perf_counter()
    made = {(sha, key): v for batch in variant_bottlenecks(augmenter, jobs, extractor.embed, BATCH)
            for sha, key, v in batch}
    seconds = (time.perf_counter() - started) / max(len(made), 1)
    vectors = np.stack([[made[f.sha256, key] for key in augmenter.keys] for f in images.files])
    made_before[augmenter.recipe] = (vectors, seconds)
    return made_before[augmenter.recipe]


def cross_validate(images: Images, variants: np.ndarray | None) -> tuple[float, float]:
    """Pooled test accuracy over the five folds, and the mean seconds of one head fit."""
    right, fit_seconds = 0, []
    for fold in range(5):
        test = np.isin(images.buckets, (2 * fold, 2 * fold + 1))
        validation = images.buckets == (2 * fold + 2) % 10
        train = ~test & ~validation
        parts = {name: Part(images.originals[mask], images.y[mask], ())
                 for name, mask in (("train", train), ("validation", validation), ("test", test))}
        extra = None
        if variants is not None and variants.shape[1]:
            rows = variants[train]
            extra = Part(rows.reshape(-1, rows.shape[-1]), np.repeat(images.y[train], rows.shape[1]), ())
        started = time.perf_counter()
        head = retraind_train_head(Dataset(images.labels, parts, "bench", variants=extra), TrainingConfig())
        fit_seconds.append(time.perf_counter() - started)
        right += int(np.sum(head.probabilities(parts["test"].x).argmax(axis=1) == parts["test"].y))
    return right / len(images.y), float(np.mean(fit_seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    config = parse_config({"data_root": tempfile.mkdtemp()}, Path.cwd())
    hooks = Hooks(make_plugin_manager())
    backbone = build_backbone(hooks, config)
    store = Store(Path(tempfile.mkdtemp()) / "s.sqlite")
    max_pixels = config.watch.max_image_pixels
    extractor = Extractor(backbone, hooks.decode_image, store, Metrics(), max_pixels, BATCH)
    images = load(args.data, extractor)
    made_before: dict[str, tuple[np.ndarray, float]] = {}
    n = len(images.y)
    print(f"\n| setting | variants per training image | held-out accuracy (mean ± sd) | range | seeds | "
          f"extra bottlenecks (all {n} images) | s per variant | head fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        results, costs, fits = [], [], []
        random = setting.variants and set(setting.distortions) - {"flip_left_right"}
        seeds = range(args.seeds) if random else range(1)
        for seed in seeds:
            augmentation = AugmentationConfig(**setting.distortions, variants_per_image=setting.variants,
                                              seed=seed)  # type: ignore[arg-type]
            augmenter = Augmenter(hooks.register_distortions(augmentation), augmentation, hooks.decode_image,
                                  backbone.input_size, max_pixels, preprocessing_of(backbone.id))
            variants, cost = (make_variants(images, augmenter, extractor, made_before) if augmenter.variants
                              else (None, 0.0))
            accuracy, fit = cross_validate(images, variants)
            results.append(accuracy)
            costs.append(cost)
            fits.append(fit)
        mean, sd, low, high = (100 * float(f(results)) for f in (np.mean, np.std, np.min, np.max))
        print(f"| {setting.name} | {setting.variants} | {mean:.1f} ± {sd:.1f} % | {low:.1f}–{high:.1f} % | "
              f"{len(results)} | "
              f"{setting.variants * n} | {np.mean(costs):.3f} | {np.mean(fits):.2f} |", flush=True)
    extractor.close()


if __name__ == "__main__":
    main()
