"""`retraind export`: the SavedModel, loaded in a fresh process as TF Serving would, gives the daemon's top-1
(and nearly its scores) on encoded files of several formats; the TFLite file gives the head's numbers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from daemon.backbone import Backbone
from daemon.cli import EX_CANTCREAT, main
from daemon.config import BackboneConfig
from daemon.export import calibrated_head
from daemon.hookspecs import hookimpl
from daemon.keras_engine import KerasBackbone
from tests.conftest import image_bytes, seed_classes, wait_for
from tests.test_cli import write_config
from tests.tiny_backbone import NAME, build_tiny

REPO = Path(__file__).resolve().parents[1]


class KerasTiny:
    """The tiny backbone as the bare KerasBackbone (the counting wrapper of the other tests is not Keras)."""

    def __init__(self) -> None:
        self.backbone = build_tiny()

    @hookimpl
    def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
        return self.backbone if config.name == NAME else None


def samples() -> dict[str, bytes]:
    """Files of the formats and modes the daemon reads: transparency, grey, palette, WebP, bigger than input."""
    rgba = np.zeros((40, 48, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 220, np.linspace(0, 255, 48, dtype=np.uint8)[None, :]
    grey = Image.open(io.BytesIO(image_bytes("blue", 12))).convert("L")
    out: dict[str, bytes] = {"red.jpg": image_bytes("red", 10), "blue.png": image_bytes("blue", 11, "PNG"),
                             "blue.webp": image_bytes("blue", 13, "WEBP"),
                             "big-red.jpg": image_bytes("red", 14, size=(400, 300))}
    for name, image, fmt in (("alpha.png", Image.fromarray(rgba), "PNG"), ("grey.jpg", grey, "JPEG"),
                             ("palette.gif", Image.open(io.BytesIO(image_bytes("red", 15))).convert("P"), "GIF")):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        out[name] = buffer.getvalue()
    return out


LOADER = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np, tensorflow as tf
    saved_model, tflite, files, pixels = sys.argv[1:5]
    model = tf.saved_model.load(saved_model)
    data = tf.constant([open(f, "rb").read() for f in json.loads(files)])
    default = model.signatures["serving_default"](image_bytes=data)["probabilities"].numpy()
    ranked = model.signatures["classify"](image_bytes=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=tflite)
    runner = interpreter.get_signature_runner()
    lite = runner(pixels=np.load(pixels))["probabilities"]
    print(json.dumps({"signatures": sorted(model.signatures), "probabilities": default.tolist(),
                      "classes": [[c.decode() for c in row] for row in ranked["classes"].numpy().tolist()],
                      "scores": ranked["scores"].numpy().tolist(), "tflite": lite.tolist()}))
""")


def test_export_serves_the_daemons_answers(tmp_path: Path, run_app: Any, capsys: pytest.CaptureFixture[str]) -> None:
    keras_tiny = KerasTiny()
    seed_classes(tmp_path)
    files = samples()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with run_app(extra=(keras_tiny,)) as app:
        version = wait_for(lambda: app.serving.version, what="first model")
        daemon = app.serving.top_k(version, app.extractor.embed(np.stack(
            [app.extractor.decode(data) for data in files.values()])), len(version.labels))

    out = tmp_path / "export"
    config = write_config(tmp_path)
    assert main(["--config", str(config), "export", "--out", str(out)], plugins=[keras_tiny]) == 0
    assert "SavedModel for TF Serving / Triton" in capsys.readouterr().out
    saved_model = out / "retraind" / "1"
    assert (saved_model / "saved_model.pb").is_file()
    assert (saved_model / "assets" / "labels.txt").read_text().splitlines() == ["blue", "red"]
    assert (out / "retraind-1.labels.txt").read_text().splitlines() == ["blue", "red"]
    assert not [p for p in (out / "retraind").iterdir() if p.name != "1"], "temporary folders left behind"

    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    paths = json.dumps([str(tmp_path / name) for name in files])
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(saved_model), str(out / "retraind-1.tflite"), paths,
         str(tmp_path / "pixels.npy")], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = json.loads(result.stdout.splitlines()[-1])

    assert exported["signatures"] == ["classify", "serving_default"]
    for name, top, probabilities, classes, scores in zip(
            files, daemon, exported["probabilities"], exported["classes"], exported["scores"]):
        assert classes[0] == top[0][0], f"{name}: exported top-1 {classes[0]}, daemon {top[0][0]}"
        assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(max(probabilities))
        assert dict(zip(classes, scores)) == pytest.approx(dict(top), abs=0.02), name
    assert isinstance(keras_tiny.backbone, KerasBackbone)
    expected = calibrated_head(version).probabilities(keras_tiny.backbone.embed(pixels))
    np.testing.assert_allclose(exported["tflite"], expected, atol=1e-4)


def test_export_refuses_a_backbone_the_model_was_not_trained_on(tmp_path: Path, run_app: Any,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    seed_classes(tmp_path, per_label=4)
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
    config = write_config(tmp_path)

    class OtherTiny:
        @hookimpl
        def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
            backbone = build_tiny()
            backbone.id = "tiny/other/v1"
            return backbone

    assert main(["--config", str(config), "export", "--out", str(tmp_path / "x")], plugins=[OtherTiny()]) == 78
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trained on tiny/seed7/v1" in err and "tiny/other/v1" in err
    assert not (tmp_path / "x").exists()


def test_export_to_a_path_that_cannot_be_written_is_one_line(tmp_path: Path, run_app: Any,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """KIND: `export --out` below a file (or anywhere nothing can be written) was a traceback, exit status 1:
    one line naming the path and exit status 73 (EX_CANTCREAT)."""
    seed_classes(tmp_path, per_label=4)
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
    config = write_config(tmp_path)
    (tmp_path / "a-file").write_text("x")

    class KerasTiny:
        @hookimpl
        def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
            return build_tiny()

    out = tmp_path / "a-file" / "export"
    assert main(["--config", str(config), "export", "--out", str(out)], plugins=[KerasTiny()]) == EX_CANTCREAT
    err = capsys.readouterr().err
    assert err.startswith(f"retraind: cannot write {out}: ") and err.count("\n") == 1, err
