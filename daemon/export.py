"""`retraind export`: the published model as one network (decode → backbone → head) in formats other servers
load, for when one machine is not enough.

- A TensorFlow SavedModel laid out for TF Serving and Triton: `<out>/<name>/<version>/`, with `labels.txt`
  in its `assets/`. Both signatures take `image_bytes`, a batch of encoded files (JPEG, PNG, GIF, BMP, WebP),
  decoded and resized inside the graph like the daemon's Pillow decoder does (bilinear with antialiasing,
  transparency flattened on white; EXIF orientation is not applied):
  `serving_default` → `probabilities` [N, labels] in `labels.txt` order, calibrated as the daemon's are;
  `classify` → `classes` and `scores` [N, labels], best first (TF Serving's classification output names).
- `<out>/<name>-<version>.tflite` with `<out>/<name>-<version>.labels.txt`: uint8 RGB pixels already resized
  to the backbone's input size → `probabilities` (TFLite has no image decoders).

Each file is written under a temporary name and renamed into place, so a server watching `<out>/<name>/`
never loads half a model.
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from daemon.atomic import TMP_PREFIX, write_atomic
from daemon.backbone import Backbone, BackboneUnavailable, ServedAs
from daemon.calibration import TemperatureScaling
from daemon.head import Head
from daemon.keras_engine import KerasBackbone
from daemon.registry import LABELS_FILE, ModelVersion
from daemon.tflite_engine import convert

#: What `export_model` reports to its progress callback as each is done, in order.
STEPS = ("build graph", "write SavedModel", "check SavedModel", "convert TFLite")
#: The largest difference in a probability the exported network may show against the daemon's own.
TOLERANCE = 1e-4
#: `serving_default`'s input (a batch of encoded files, strings) and output (float32 [N, labels])
INPUT, OUTPUT = "image_bytes", "probabilities"


class ExportError(Exception):
    """The exported network does not give the daemon's answers; nothing was published."""


@dataclass(frozen=True)
class Exported:
    saved_model: Path
    tflite: Path
    labels: Path


def _decode(data: Any, height: int, width: int) -> Any:
    import tensorflow as tf

    image = tf.cast(tf.io.decode_image(data, expand_animations=False), tf.float32)  # 1, 2, 3 or 4 channels
    channels = tf.shape(image)[-1]
    colour = tf.cond(channels >= 3, lambda: image[..., :3], lambda: tf.tile(image[..., :1], [1, 1, 3]))
    alpha = tf.cond(channels % 2 == 0, lambda: image[..., -1:] / 255.0, lambda: tf.ones_like(image[..., :1]))
    flat = colour * alpha + 255.0 * (1.0 - alpha)
    resized = tf.image.resize(flat, (height, width), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _classifier(version: ModelVersion, backbone: KerasBackbone) -> Any:
    """uint8 pixels → probabilities: the daemon's own uint8 network, then the head as a softmax layer."""
    import keras

    width, height = backbone.input_size
    pixels = keras.Input((height, width, 3), dtype="uint8", name="pixels")
    head = keras.layers.Dense(len(version.labels), activation="softmax", name="probabilities")
    outputs = {"probabilities": head(backbone.network(pixels))}  # a dict names the TFLite output
    model = keras.Model(pixels, outputs, name=f"retraind_{version.number}")
    calibrated = calibrated_head(version)
    head.set_weights([calibrated.weights, calibrated.bias])
    return model


def calibrated_head(version: ModelVersion) -> Head:
    """A head whose plain softmax gives the daemon's calibrated scores: temperature scaling folds into the
    weights (softmax((xW + b) / T) = softmax(x(W/T) + b/T)); another calibrator cannot be exported."""
    calibrator = version.trust.calibrator if version.trust is not None else None
    if calibrator is None:
        return version.head
    if not isinstance(calibrator, TemperatureScaling):
        raise ExportError(f"model {version.number}: its calibrator {calibrator.name!r} cannot be folded into an "
                          "exported network (only temperature scaling can)")
    t = np.float32(calibrator.temperature)
    return Head(version.head.weights / t, version.head.bias / t)


def _module(version: ModelVersion, classifier: Any, size: tuple[int, int]) -> Any:
    """A tf.Module with the serving signatures over `classifier`, and `labels.txt` as an asset."""
    import tensorflow as tf

    width, height = size
    module = tf.Module()
    module.classifier = classifier
    module.labels_asset = tf.saved_model.Asset(str(version.directory / LABELS_FILE))
    labels = tf.constant(list(version.labels))

    def probabilities(image_bytes: Any) -> Any:
        spec = tf.TensorSpec([height, width, 3], tf.uint8)
        pixels = tf.map_fn(lambda data: _decode(data, height, width), image_bytes, fn_output_signature=spec)
        return module.classifier(pixels, training=False)["probabilities"]

    encoded = [tf.TensorSpec([None], tf.string, name=INPUT)]

    @tf.function(input_signature=encoded)  # type: ignore[untyped-decorator]
    def serving_default(image_bytes: Any) -> dict[str, Any]:
        return {OUTPUT: probabilities(image_bytes)}

    @tf.function(input_signature=encoded)  # type: ignore[untyped-decorator]
    def classify(image_bytes: Any) -> dict[str, Any]:
        scores = probabilities(image_bytes)
        order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)
        return {"classes": tf.gather(labels, order), "scores": tf.gather(scores, order, batch_dims=1)}

    module.serving_default, module.classify = serving_default, classify
    return module


def _check(saved_model: Path, version: ModelVersion, backbone: KerasBackbone) -> None:
    """Run the SavedModel as a server would, on a losslessly encoded image, against the daemon's numbers."""
    import tensorflow as tf

    width, height = backbone.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    loaded = tf.saved_model.load(str(saved_model))
    got = loaded.signatures["serving_default"](image_bytes=tf.constant([png.getvalue()]))["probabilities"]
    want = calibrated_head(version).probabilities(backbone.embed(pixels[None]))
    if not np.allclose(np.asarray(got), want, atol=TOLERANCE):
        raise ExportError(f"the exported network differs from the daemon's: {np.asarray(got)} vs {want}")


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an older folder of that name is swapped out, then removed."""
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{time.time_ns()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def keras_network(backbone: Backbone) -> KerasBackbone:
    """The Keras engine `backbone` must be: the export writes its whole network (of a `ServedAs`, the network
    itself: the SavedModel decodes and resizes in its own graph, whatever the preprocessing version). Raises
    BackboneUnavailable (naming `backbone.name`) when the backbone's plugin built another kind."""
    if isinstance(backbone, ServedAs):
        backbone = backbone.backbone
    if not isinstance(backbone, KerasBackbone):
        raise BackboneUnavailable(f"backbone.name: export needs a Keras network; the plugin for {backbone.id} "
                                  "built another kind")
    return backbone


def write_saved_model(version: ModelVersion, backbone: KerasBackbone, directory: Path,
                      on_step: Callable[[str], object] = lambda step: None) -> Any:
    """Write `version` (with `backbone`, the one it was trained on) as a SavedModel in `directory` (new), run
    it against the daemon's own numbers (raises `ExportError`), and return the Keras classifier it wraps."""
    import tensorflow as tf

    classifier = _classifier(version, backbone)
    module = _module(version, classifier, backbone.input_size)
    on_step(STEPS[0])
    signatures = {"serving_default": module.serving_default, "classify": module.classify}
    tf.saved_model.save(module, str(directory), signatures=signatures)
    on_step(STEPS[1])
    _check(directory, version, backbone)
    on_step(STEPS[2])
    return classifier


def export_model(
    version: ModelVersion, backbone: Backbone, out: Path, name: str,
    on_step: Callable[[str], object] = lambda step: None,
) -> Exported:
    """Write `version` (with `backbone`, the one it was trained on, as its Keras engine) below `out`; returns
    the paths written."""
    keras_backbone = keras_network(backbone)
    base = out / name
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f"{TMP_PREFIX}{version.number}-{time.time_ns()}"
    try:
        classifier = write_saved_model(version, keras_backbone, tmp, on_step)
        tflite_bytes = convert(classifier)
        on_step(STEPS[3])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    saved_model = base / str(version.number)
    replace_dir(tmp, saved_model)
    tflite, labels = out / f"{name}-{version.number}.tflite", out / f"{name}-{version.number}.labels.txt"
    write_atomic(labels, (version.directory / LABELS_FILE).read_bytes())
    write_atomic(tflite, tflite_bytes)
    return Exported(saved_model, tflite, labels)
