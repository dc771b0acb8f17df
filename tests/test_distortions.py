"""Cached augmentation: the seed's four distortions with its meaning, variants made once for training images
only, stored beside the original, re-made when the recipe changes, and dropped with their image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.app import App
from daemon.augment import Augmenter
from daemon.backbone import PREPROCESSING
from daemon.config import AugmentationConfig
from daemon.dataset import content_splits
from daemon.hookspecs import hookimpl
from daemon.plugin_manager import Hooks, make_plugin_manager
from daemon.split import TRAIN
from plugins.distortions import Brightness, CropScale, FlipLeftRight
from tests.conftest import image_bytes, seed_classes, wait_for
from tests.tiny_backbone import TinyBackbonePlugin

SIZE = (100, 80)


def gradient(width: int, height: int) -> np.ndarray:
    """An image whose every pixel is distinct, so a crop's position can be recovered."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 2 % 256, ys * 3 % 256, (xs + ys) % 256], axis=-1).astype(np.uint8)


def augmenter(hooks: Hooks, **settings: Any) -> Augmenter:
    config = AugmentationConfig(**settings)
    return Augmenter(hooks.register_distortions(config), config, hooks.decode_image, SIZE, 10**8, PREPROCESSING)


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks(make_plugin_manager())


def test_random_crop_cuts_an_input_sized_box_from_the_enlarged_image() -> None:
    crop = CropScale(crop=10, scale=0)
    assert crop.oversample == pytest.approx(1.1)
    image = gradient(110, 88)  # exactly (1 + 10%) times SIZE: the resize is the identity
    offsets = set()
    for seed in range(20):
        out = crop.apply(image, SIZE, 0, np.random.default_rng(seed))
        assert out.shape == (80, 100, 3)
        top, left = int(np.argwhere(image[:, :, 1] == out[0, 0, 1])[0][0]), int(out[0, 0, 0]) // 2
        assert np.array_equal(out, image[top : top + 80, left : left + 100])
        offsets.add((top, left))
    assert len(offsets) > 5  # the position is random


def test_random_scale_enlarges_by_a_uniform_factor_up_to_the_percent() -> None:
    scale = CropScale(crop=0, scale=50)
    assert scale.oversample == pytest.approx(1.5)
    image = np.zeros((120, 150, 3), np.uint8)
    image[:, :75] = 255  # left half white: how much white survives tells the zoom
    whites = [scale.apply(image, SIZE, 0, np.random.default_rng(s)).mean() / 255 for s in range(40)]
    assert min(whites) < 0.4 and max(whites) > 0.6  # sometimes zoomed into one half, sometimes the other


def test_flip_mirrors_every_other_variant_and_alone_makes_one(hooks: Hooks) -> None:
    image = gradient(*SIZE)
    rng = np.random.default_rng(0)
    assert np.array_equal(FlipLeftRight().apply(image, SIZE, 0, rng), image[:, ::-1])
    assert np.array_equal(FlipLeftRight().apply(image, SIZE, 1, rng), image)
    assert augmenter(hooks, flip_left_right=True, variants_per_image=5).variants == 1
    assert augmenter(hooks, flip_left_right=True, random_brightness=10, variants_per_image=5).variants == 5


def test_brightness_multiplies_within_the_percent_range_and_clips() -> None:
    image = np.full((10, 10, 3), 100, np.uint8)
    levels = [int(Brightness(30).apply(image, SIZE, 0, np.random.default_rng(s))[0, 0, 0]) for s in range(200)]
    assert 70 <= min(levels) < 80 and 120 < max(levels) <= 130
    bright = np.full((10, 10, 3), 250, np.uint8)
    assert Brightness(30).apply(bright, SIZE, 0, np.random.default_rng(1)).max() <= 255


def test_recipe_names_settings_and_seed_and_variants_are_reproducible(hooks: Hooks) -> None:
    data = image_bytes("red", seed=3, size=(160, 120))
    on = augmenter(hooks, random_crop=10, random_brightness=20, variants_per_image=3)
    assert len(on.recipe) == 12 and on.keys == tuple(f"{on.recipe}.{i}" for i in range(3))
    assert augmenter(hooks, random_crop=10, random_brightness=20, variants_per_image=9).recipe == on.recipe
    assert augmenter(hooks, random_crop=11, random_brightness=20, variants_per_image=3).recipe != on.recipe
    assert augmenter(hooks, random_crop=10, random_brightness=20, seed=1).recipe != on.recipe
    first = on.image(data, "a" * 64, 0)
    assert first.shape == (80, 100, 3) and first.dtype == np.uint8
    assert np.array_equal(first, on.image(data, "a" * 64, 0))
    assert not np.array_equal(first, on.image(data, "a" * 64, 1))
    assert not np.array_equal(first, on.image(data, "b" * 64, 0))
    off = augmenter(hooks, variants_per_image=3)
    assert (off.variants, off.keys, off.summary) == (0, (), None)


class Invert:
    """A third-party distortion, contributed through the same hook as the built-ins."""

    name, setting, oversample, variety = "invert", "v1", 1.0, 2

    def apply(self, image: np.ndarray, size: tuple[int, int], index: int,
              rng: np.random.Generator) -> np.ndarray:
        return 255 - image


class InvertPlugin:
    @hookimpl
    def retraind_register_distortions(self, config: AugmentationConfig) -> list[Invert]:
        return [Invert()]


def test_third_party_distortions_run_before_the_builtins() -> None:
    hooks = Hooks(make_plugin_manager(extra=[InvertPlugin()]))
    config = AugmentationConfig(random_brightness=10)
    assert [d.name for d in hooks.register_distortions(config)] == ["invert", "random_brightness"]
    assert augmenter(hooks).summary["distortions"] == {"invert": "v1"}  # type: ignore[index]
    assert Hooks(make_plugin_manager(disabled=["distortions"])).register_distortions(config) == []


# -- in the daemon ---------------------------------------------------------------------------------------


def train_shas(app: App) -> set[str]:
    entries = [e for e in app.store.catalog().values() if e.ok]
    return {str(e.sha256) for e, split in zip(entries, content_splits(entries, app.config.split)) if split == TRAIN}


def variant_rows(app: App) -> set[tuple[str, str]]:
    return {key for key in app.store.variant_vectors(app.backbone.id, "") if key[1]}  # "" is the original


def test_variants_are_made_once_for_training_images_only(
    tmp_path: Path, run_app: Any, tiny: TinyBackbonePlugin,
) -> None:
    seed_classes(tmp_path)
    augmentation = {"flip_left_right": True, "random_crop": 20, "variants_per_image": 2}
    with run_app(augmentation=augmentation) as app:
        version = wait_for(lambda: app.serving.version, what="first model")
        train = train_shas(app)
        recipe = version.metrics["augmentation"]["recipe"]
        assert 0 < len(train) < 24  # some images are validation images
        assert variant_rows(app) == {(sha, f"{recipe}.{i}") for sha in train for i in range(2)}
        assert tiny.images_embedded == 24 + 2 * len(train)  # the originals, the variants
        assert version.metrics["variant_rows"] == 2 * len(train)
        assert version.head.hyperparameters["train_rows"] == 3 * len(train)
        assert sum(c["train"] for c in version.metrics["images"].values()) == len(train)  # originals only
        app.trainer.request()
        wait_for(lambda: app.trainer.runs >= 2, what="a second run")
        assert tiny.images_embedded == 24 + 2 * len(train)  # nothing made twice


def test_changed_recipe_retrains_remakes_and_prunes_and_variants_leave_with_their_image(
    tmp_path: Path, run_app: Any, tiny: TinyBackbonePlugin,
) -> None:
    seed_classes(tmp_path)
    with run_app(augmentation={"random_crop": 20, "variants_per_image": 1}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        old = variant_rows(app)
    made = tiny.images_embedded

    with run_app(augmentation={"random_crop": 30, "variants_per_image": 1}) as app:
        wait_for(lambda: app.serving.version and app.serving.version.number == 2,
                 what="a retrain for the new recipe, with no file changed")
        version = app.serving.version
        assert version is not None
        train = train_shas(app)
        new = variant_rows(app)
        assert tiny.images_embedded == made + len(train)  # originals came from the store
        assert not old & new and {sha for sha, _ in new} == train
        assert version.metrics["augmentation"]["distortions"] == {"random_crop_scale": "crop=30,scale=0"}

        catalog = sorted(app.store.catalog().values(), key=lambda e: e.path)
        gone, sha = next((e.path, str(e.sha256)) for e in catalog if e.sha256 in train)
        runs = app.trainer.runs
        os.unlink(tmp_path / "data" / "classes" / gone)
        wait_for(lambda: app.trainer.runs > runs, what="a run after the delete")
        assert sha not in {s for s, _ in variant_rows(app)}
        assert len(variant_rows(app)) == len(train) - 1

    with run_app() as app:  # augmentation off: a retrain without variants, and all of them pruned
        wait_for(lambda: app.trainer.runs, what="a retrain without augmentation")
        assert variant_rows(app) == set()
        assert app.serving.version is not None and app.serving.version.metrics["augmentation"] is None
