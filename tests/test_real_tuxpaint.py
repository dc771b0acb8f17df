"""Real learning, end to end: the default EfficientNet-Lite0 backbone with its real ImageNet weights, through
the real daemon, on ../shared/data/tuxpaint6 (403 real images, 6 classes). Select with `-m real`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from daemon.app import App
from daemon.config import parse_config
from tests.conftest import SHARED_DATA, wait_for

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data set not found at {SHARED_DATA}"),
]

#: A linear head on these features reaches about 0.88 on held-out images (DESIGN.md); measured here through
#: the daemon: see the README. The bar sits a few points under that, so a real regression fails.
ACCURACY_BAR = 0.85


def _split_copy(classes: Path, inbox_later: Path) -> dict[str, str]:
    """Copy every class folder, holding out every fifth image (sorted by name) for the inbox."""
    held_out: dict[str, str] = {}
    for folder in sorted(p for p in SHARED_DATA.iterdir() if p.is_dir()):
        for i, image in enumerate(sorted(folder.iterdir())):
            target = (inbox_later if i % 5 == 0 else classes / folder.name) / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
            if i % 5 == 0:
                held_out[image.name] = folder.name
    return held_out


def test_held_out_accuracy_through_the_daemon(tmp_path: Path) -> None:
    data = tmp_path / "data"
    held_out = _split_copy(data / "classes", tmp_path / "held_out")
    training_images = sum(1 for _ in (data / "classes").rglob("*.jpg"))
    config = parse_config({"data_root": str(data), "http": {"port": 0},
                           "training": {"quiet_period_seconds": 1}}, tmp_path)
    with App(config) as app:
        def trained_on_all() -> bool:
            version = app.serving.version
            return bool(version) and sum(
                sum(per.values()) for per in version.metrics["images"].values()) == training_images
        wait_for(trained_on_all, timeout=600, what="a model trained on every training image")
        for image in (tmp_path / "held_out").iterdir():
            shutil.move(image, data / "inbox" / image.name)
        results = data / "results.jsonl"
        wait_for(lambda: results.exists() and len(results.read_text().splitlines()) == len(held_out),
                 timeout=300, what="every held-out image classified")
        assert app.metrics.cache_misses._value.get() == training_images + len(held_out)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    correct = sum(r["label"] == held_out[r["file"]] for r in records)
    accuracy = correct / len(held_out)
    print(f"held-out accuracy {accuracy:.4f} ({correct}/{len(held_out)})")
    assert accuracy >= ACCURACY_BAR
    for r in records:  # where they land says the same thing as the record: review exactly when it gives a reason
        assert r["review_reason"] in (None, "low_confidence", "unfamiliar")
        expected = data / ("review" if r["review_reason"] else f"outbox/{r['label']}") / r["file"]
        assert Path(r["destination"]) == expected and expected.exists()
    filed = [r for r in records if not r["review_reason"]]
    unfamiliar = sum(r["review_reason"] == "unfamiliar" for r in records)  # README "Filing": 30% at the default
    print(f"filed {len(filed)}, unfamiliar {unfamiliar} ({unfamiliar / len(records):.1%}) of {len(records)}")
    assert len(filed) >= len(records) // 2, "most held-out images of taught classes are filed, not reviewed"
