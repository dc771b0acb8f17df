"""The seed's backbone: Keras InceptionV3 without its top, average-pooled, 299×299 input scaled to [-1, 1],
2048-float bottlenecks. ImageNet weights come from Keras's download (cached under the state dir) or a local
`.h5` file named by `backbone.weights`. `backbone.engine` picks Keras or its TFLite conversion
(daemon/engines.py); both give the same bottlenecks under the same id."""

from __future__ import annotations

import hashlib
from pathlib import Path

from daemon.backbone import PREPROCESSING, Backbone, BackboneUnavailable
from daemon.config import BackboneConfig
from daemon.engines import select_engine
from daemon.hookspecs import hookimpl
from daemon.keras_engine import KerasBackbone

NAME = "inception_v3"
WEIGHTS_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/{WEIGHTS_FILE}"
WEIGHTS_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"


def imagenet_weights(cache_dir: Path) -> Path:
    """The no-top ImageNet weights, downloaded once into `cache_dir` by Keras (md5-checked)."""
    import keras

    try:
        return Path(keras.utils.get_file(WEIGHTS_FILE, WEIGHTS_URL, cache_subdir="", cache_dir=str(cache_dir),
                                         file_hash=WEIGHTS_MD5))
    except Exception as exc:
        raise BackboneUnavailable(
            f"backbone.weights: cannot download ImageNet weights for {NAME} ({str(exc).splitlines()[0][:160]}); "
            f"this machine may be offline: put {WEIGHTS_FILE} in {cache_dir} or set backbone.weights to a "
            "local .h5 file (or use backbone.name: efficientnet_lite0, whose weights install with pip)"
        ) from exc


def weights_file(weights: str, cache_dir: Path) -> Path:
    path = imagenet_weights(cache_dir) if weights == "imagenet" else Path(weights).expanduser()
    if not path.is_file():
        raise BackboneUnavailable(f"backbone.weights: {path} is not a file (give 'imagenet' or a .h5 path)")
    return path


def backbone_id(path: Path) -> str:
    with path.open("rb") as fh:
        return f"{NAME}/{hashlib.file_digest(fh, 'sha256').hexdigest()[:16]}/{PREPROCESSING}"


def build(weights: str, cache_dir: Path) -> KerasBackbone:
    """The Keras engine; the TFLite engine is converted from it."""
    path = weights_file(weights, cache_dir)
    import keras

    model = keras.applications.InceptionV3(include_top=False, weights=None, pooling="avg",
                                           input_shape=(299, 299, 3))
    try:
        model.load_weights(str(path))
    except (OSError, ValueError) as exc:
        raise BackboneUnavailable(f"backbone.weights: {path} does not hold InceptionV3 weights: {exc}") from exc
    return KerasBackbone(model, backbone_id(path), scale=2.0 / 255.0, offset=-1.0)


@hookimpl(trylast=True)
def retraind_make_backbone(config: BackboneConfig, cache_dir: Path) -> Backbone | None:
    if config.name != NAME:
        return None
    path = weights_file(config.weights, cache_dir)
    # TFLite 11.9 against Keras 9.2 img/s on an idle 2-core machine (equal within the noise on a busy one).
    return select_engine(config, cache_dir, backbone_id(path), lambda: build(str(path), cache_dir),
                         cpu_engine="tflite")
