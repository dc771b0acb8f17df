"""retrain.py's four distortions, with the seed's meaning of each setting (its `add_input_distortions`):

- `random_crop` (percent): the margin around the crop box. The image is resized to (1 + crop/100) times the
  backbone input and an input-sized box is cut from it at a random position.
- `random_scale` (percent): a random enlargement before that crop; the resize factor is multiplied by a
  uniform draw from [1, 1 + scale/100].
- `flip_left_right`: mirror horizontally. The seed mirrored each distorted image with probability 1/2; a
  cached variant decided by a coin would often repeat the original, so here every other variant is mirrored,
  starting with the first: with the original, half of an image's rows are mirrored, as in the seed.
- `random_brightness` (percent): pixels multiplied by a uniform draw from [1 - b/100, 1 + b/100], then
  clipped to 0..255 (the seed fed the unclipped product to the network).

They run in the seed's order: crop and scale, flip, brightness. The plugin is `trylast`, so another plugin's
distortions run before them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daemon.augment import Distortion, resize
from daemon.config import AugmentationConfig
from daemon.hookspecs import hookimpl


@dataclass(frozen=True)
class CropScale:
    crop: float
    scale: float
    name: str = "random_crop_scale"
    variety: int = 0

    @property
    def setting(self) -> str:
        return f"crop={self.crop:g},scale={self.scale:g}"

    @property
    def oversample(self) -> float:
        return (1 + self.crop / 100) * (1 + self.scale / 100)

    def apply(self, image: np.ndarray, size: tuple[int, int], index: int,
              rng: np.random.Generator) -> np.ndarray:
        factor = (1 + self.crop / 100) * rng.uniform(1.0, 1 + self.scale / 100)
        width, height = int(size[0] * factor), int(size[1] * factor)
        top, left = rng.integers(0, height - size[1] + 1), rng.integers(0, width - size[0] + 1)
        return resize(image, (width, height))[top : top + size[1], left : left + size[0]]


@dataclass(frozen=True)
class FlipLeftRight:
    name: str = "flip_left_right"
    setting: str = "every_other"
    oversample: float = 1.0
    variety: int = 2

    def apply(self, image: np.ndarray, size: tuple[int, int], index: int,
              rng: np.random.Generator) -> np.ndarray:
        return image[:, ::-1] if index % 2 == 0 else image


@dataclass(frozen=True)
class Brightness:
    percent: float
    name: str = "random_brightness"
    oversample: float = 1.0
    variety: int = 0

    @property
    def setting(self) -> str:
        return f"{self.percent:g}"

    def apply(self, image: np.ndarray, size: tuple[int, int], index: int,
              rng: np.random.Generator) -> np.ndarray:
        factor = rng.uniform(1 - self.percent / 100, 1 + self.percent / 100)
        return np.clip(np.rint(image * np.float32(factor)), 0, 255).astype(np.uint8)


@hookimpl(trylast=True)
def retraind_register_distortions(config: AugmentationConfig) -> list[Distortion]:
    chosen: list[Distortion] = []
    if config.random_crop or config.random_scale:
        chosen.append(CropScale(config.random_crop, config.random_scale))
    if config.flip_left_right:
        chosen.append(FlipLeftRight())
    if config.random_brightness:
        chosen.append(Brightness(config.random_brightness))
    return chosen
