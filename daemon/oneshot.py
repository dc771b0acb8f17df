"""Commands that use the published model without a running daemon: `retraind classify` and `retraind export`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.backbone import Backbone, preprocessing_of, served_as
from daemon.config import Config, ConfigError
from daemon.engines import build_backbone
from daemon.images import ImageRejected, read_image_file
from daemon.plugin_manager import Hooks
from daemon.registry import ModelRegistry, ModelVersion
from daemon.serving import ServingModel
from daemon.trust import load_trust


class NoModel(Exception):
    """Nothing is published yet; the message says what to do."""


@dataclass(frozen=True)
class Published:
    """The current model version with the backbone it was trained on and the plugins that decode images."""

    version: ModelVersion
    backbone: Backbone
    hooks: Hooks


def load_published(config: Config, plugins: Iterable[object] = (), engine: str | None = None) -> Published:
    """The CURRENT version and its backbone (`engine` overrides `backbone.engine`, e.g. `keras` for export). A
    version of the configured network under another preprocessing version the decoder makes (a store being
    migrated, `daemon/migration.py`) is run as the daemon serves it: the configured network, images decoded with
    the version's own preprocessing (`served_as`). Another network is a `ConfigError`."""
    version = ModelRegistry.of(config).current()
    if version is None:
        raise NoModel(f"no model yet: add images under {config.folder('classes')}/<label>/ and let the "
                      "daemon train")
    if engine is not None:
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, engine=engine))
    hooks = Hooks.of(config, plugins)
    configured = build_backbone(hooks, config)
    backbone = served_as(configured, version.backbone, hooks.preprocessing_versions())
    if backbone is None:
        raise ConfigError(f"backbone.name: model {version.number} was trained on {version.backbone}, but the "
                          f"config builds {configured.id}; set backbone.name/weights to match or let it retrain")
    return Published(dataclasses.replace(version, trust=load_trust(version, hooks)), backbone, hooks)


def classify_files(
    config: Config, model: Published, files: Iterable[Path],
) -> Iterator[tuple[Path, tuple[tuple[str, float], ...] | ImageRejected]]:
    """Per file, its top-k (label, score) pairs best first, or why it is not a usable image."""
    version, backbone = model.version, model.backbone
    for path in files:
        try:
            f = read_image_file(path, config.watch.max_file_bytes)
            image = model.hooks.decode_image(f.data, backbone.input_size, config.watch.max_image_pixels,
                                             preprocessing_of(backbone.id))
            if image is None:
                raise ImageRejected("unsupported", "no decoder plugin could read this content")
        except ImageRejected as exc:
            yield path, exc
            continue
        (top,) = ServingModel.top_k(version, np.asarray(backbone.embed(image[None])), config.classify.top_k)
        yield path, top
