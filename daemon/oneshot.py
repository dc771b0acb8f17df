"""`retraind classify FILE...`: top-k with the published model, without a running daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from daemon.app import build_backbone
from daemon.config import Config
from daemon.images import ImageRejected, read_image_file
from daemon.plugin_manager import Hooks, make_plugin_manager
from daemon.registry import ModelRegistry
from daemon.serving import ServingModel


def classify_files(config: Config, files: list[Path]) -> Iterator[str]:
    version = ModelRegistry(config.folder("state") / "models", config.training.keep_versions).current()
    if version is None:
        yield "no model yet: add images under classes/<label>/ and let the daemon train"
        return
    hooks = Hooks(make_plugin_manager(config.plugins.disable))
    backbone = build_backbone(hooks, config)
    for path in files:
        try:
            f = read_image_file(path, config.watch.max_file_bytes)
            image = hooks.decode_image(f.data, backbone.input_size, config.watch.max_image_pixels)
            if image is None:
                raise ImageRejected("unsupported", "no decoder could read it")
        except ImageRejected as exc:
            yield f"{path}: rejected ({exc.reason}): {exc}"
            continue
        (top,) = ServingModel.top_k(version, backbone.embed(image[None]), config.classify.top_k)
        yield f"{path}:" + "".join(f"\n  {label} (score = {score:.5f})" for label, score in top)
