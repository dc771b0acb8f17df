"""Pictures of a model version (training curve, confusion matrix) and the HTML report built from them, from a
real daemon that trained on images it must get partly wrong."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from daemon.registry import CONFUSION_MATRIX_FILE, TRAINING_CURVE_FILE, ModelRegistry
from daemon.report import write_report
from tests.conftest import seed_classes, wait_for, write_image


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def decode_data_uri(uri: str) -> Image.Image:
    match = re.fullmatch(r"data:image/(png|jpeg);base64,(.+)", uri)
    assert match, uri[:40]
    return Image.open(io.BytesIO(base64.b64decode(match.group(2))))


def assert_drawn(image: Image.Image, min_size: tuple[int, int]) -> None:
    assert image.width >= min_size[0] and image.height >= min_size[1]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10, "the picture is blank"


def trained(tmp_path: Path, run_app: Any) -> Any:
    """A model trained with some blue images filed under red, so the held-out split has mistakes."""
    seed_classes(tmp_path, per_label=16)
    for i in range(8):
        write_image(tmp_path / "data" / "classes" / "red" / f"mislabelled-{i}.jpg", "blue", seed=3000 + i)
    with run_app(split={"validation_percentage": 40}) as app:
        return wait_for(lambda: app.serving.version, what="first model")


def test_pictures_and_recorded_mistakes(tmp_path: Path, run_app: Any) -> None:
    version = trained(tmp_path, run_app)
    directory = tmp_path / "data" / "state" / "models" / "1"  # drawn once the model serves, not before
    wait_for(lambda: (directory / TRAINING_CURVE_FILE).is_file() and (directory / CONFUSION_MATRIX_FILE).is_file(),
             what="the plots")
    curve, matrix = Image.open(directory / TRAINING_CURVE_FILE), Image.open(directory / CONFUSION_MATRIX_FILE)
    assert curve.format == matrix.format == "PNG"
    assert_drawn(curve, (800, 300))
    assert_drawn(matrix, (400, 400))

    metrics = json.loads((directory / "metrics.json").read_text())
    mistakes = metrics["mistakes"]
    assert mistakes, "mislabelled images in the validation split must show up as mistakes"
    assert all(m["true"] != m["predicted"] for m in mistakes)
    assert [m["score"] for m in mistakes] == sorted((m["score"] for m in mistakes), reverse=True)
    assert all((tmp_path / "data" / "classes" / m["path"]).is_file() for m in mistakes)
    wrong = sum(sum(row) for row in metrics["confusion_matrix"]) - np.trace(metrics["confusion_matrix"])
    assert len(mistakes) == min(wrong, 20)
    history, chosen = version.head.history, version.head.hyperparameters
    assert len(history["l2"]) == len(history["train_loss"]) == len(history["validation_accuracy"])
    assert history["l2"][0] == max(history["l2"])  # the path starts at the strongest L2, from zero weights
    last_segment = list(itertools.takewhile(lambda l2: l2 == chosen["l2"], reversed(history["l2"])))
    assert len(last_segment) == chosen["iterations"]  # the chosen fit is the curve's last segment


def test_report_page(tmp_path: Path, run_app: Any) -> None:
    trained(tmp_path, run_app)
    data = tmp_path / "data"
    version = ModelRegistry(data / "state" / "models", 5).current()
    assert version is not None
    gone = version.metrics["mistakes"][0]["path"]
    (data / "classes" / gone).unlink()
    out = tmp_path / "out" / "report.html"
    write_report(version, data / "classes", out)

    page = _Images()
    page.feed(out.read_text(encoding="utf-8"))
    text = " ".join(page.text)
    assert "retraind model 1" in text and "file gone" in text
    for label in ("red", "blue"):
        assert label in text
    plots = [img for img in page.images if img.get("class") == "plot"]
    assert [img["alt"] for img in plots] == ["training curve", "confusion matrix"]
    for img in plots:
        assert_drawn(decode_data_uri(str(img["src"])), (400, 300))
    thumbnails = [img for img in page.images if img.get("class") != "plot"]
    assert len(thumbnails) == len(version.metrics["mistakes"]) - 1
    for img in thumbnails:
        assert max(decode_data_uri(str(img["src"])).size) <= 160


def test_report_escapes_label_names(tmp_path: Path, run_app: Any) -> None:
    seed_classes(tmp_path, per_label=6, labels=("red", "blue"))
    for i in range(6):
        write_image(tmp_path / "data" / "classes" / "<i>green & co" / f"g{i}.jpg", "green", seed=4000 + i)
    with run_app() as app:
        version = wait_for(lambda: app.serving.version, what="first model")
    out = tmp_path / "report.html"
    write_report(version, tmp_path / "data" / "classes", out)
    html = out.read_text(encoding="utf-8")
    assert "<i>green" not in html and "&lt;i&gt;green &amp; co" in html
