"""The whole loop through a real daemon: real files, real watchdog events, real HTTP, the tiny backbone."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from daemon.app import App
from tests.conftest import seed_classes, wait_for, write_image
from tests.tiny_backbone import TinyBackbonePlugin


def scrape(app: App) -> dict[str, float]:
    assert app.http is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def get(app: App, path: str) -> tuple[int, Any]:
    assert app.http is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def results(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "data" / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_inbox_waits_for_first_model_then_classifies(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    with run_app() as app:
        assert get(app, "/readyz")[0] == 503
        assert get(app, "/healthz") == (200, {"alive": True, "status": "ok", "missing_folders": []})
        early = write_image(data / "inbox" / "early red.jpg", "red", seed=900)
        seed_classes(tmp_path)
        wait_for(lambda: app.serving.version, what="first model")
        assert get(app, "/readyz")[0] == 200
        wait_for(lambda: not early.exists(), what="the early inbox file to be classified")
        write_image(data / "inbox" / "late-blue.png", "blue", seed=901, fmt="PNG")
        wait_for(lambda: len(results(tmp_path)) == 2, what="two result records")
    by_file = {r["file"]: r for r in results(tmp_path)}
    assert by_file["early red.jpg"]["label"] == "red"
    assert by_file["late-blue.png"]["label"] == "blue"
    for record in by_file.values():
        moved = Path(record["destination"])
        assert moved.parent == data / "outbox" / record["label"]
        assert moved.exists()
        sidecar = json.loads(moved.with_name(moved.name + ".json").read_text())
        assert sidecar == record
        assert record["model_version"] >= 1 and len(record["sha256"]) == 64
        assert next(t["label"] for t in record["top_k"]) == record["label"]
    assert list((data / "inbox").iterdir()) == []


def test_low_confidence_goes_to_review_and_garbage_to_rejected(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path)
    with run_app(classify={"confidence_threshold": 1.0}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        write_image(data / "inbox" / "unsure.jpg", "red", seed=77)
        (data / "inbox" / "notes.jpg").write_text("this is not an image")
        wait_for(lambda: (data / "review" / "unsure.jpg").exists(), what="review")
        wait_for(lambda: (data / "rejected" / "notes.jpg").exists(), what="rejected")
        error = json.loads((data / "rejected" / "notes.jpg.error.json").read_text())
        assert error["reason"] == "unsupported" and "image" in error["error"]
        # the counters move just after the files do: wait for them rather than race them
        metrics = wait_for(lambda: (m := scrape(app))["retraind_rejected_files_total{reason=unsupported}"] == 1
                           and m["retraind_classifications_total{label=red,outcome=review}"] == 1 and m,
                           what="the reject and review counted")
    assert metrics["retraind_rejected_files_total{reason=unsupported}"] == 1
    assert metrics["retraind_classifications_total{label=red,outcome=review}"] == 1


def test_metrics_after_training(tmp_path: Path, run_app: Any) -> None:
    seed_classes(tmp_path)
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
        metrics = scrape(app)
    assert metrics["retraind_model_version"] == 1
    assert metrics["retraind_training_runs_total{result=promoted}"] == 1
    assert metrics["retraind_bottleneck_cache_misses_total"] == 24
    assert metrics["retraind_images{label=red,split=train}"] + metrics["retraind_images{label=red,split=validation}"] == 12
    assert 0.5 <= metrics["retraind_model_accuracy_ratio{split=train}"] <= 1.0
    assert metrics["retraind_last_training_timestamp_seconds"] > 0


def test_restart_rename_delete_and_swap(tmp_path: Path, run_app: Any, tiny: TinyBackbonePlugin) -> None:
    classes = tmp_path / "data" / "classes"
    seed_classes(tmp_path)
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
    computed = tiny.images_embedded
    assert computed == 24  # each image once (the engine's black warm-up batches are not counted)

    # While stopped: rename one file, delete another, add a new label.
    os.rename(classes / "red" / "red-0.jpg", classes / "red" / "renamed.jpg")
    (classes / "blue" / "blue-0.jpg").unlink()
    for i in range(6):
        write_image(classes / "green" / f"g{i}.jpg", "green", seed=500 + i)

    with run_app() as app:
        assert app.serving.version is not None and app.serving.version.number == 1  # served at once
        wait_for(lambda: app.serving.version and app.serving.version.number == 2, what="retrained model")
        version = app.serving.version
        assert version.labels == ("blue", "green", "red")
        assert tiny.images_embedded == computed + 6  # only the new green images
        catalog = app.store.catalog()
        assert "red/renamed.jpg" in catalog and "red/red-0.jpg" not in catalog
        assert "blue/blue-0.jpg" not in catalog

        # While running: a move between labels retrains without any backbone call.
        before = tiny.images_embedded
        os.rename(classes / "green" / "g0.jpg", classes / "blue" / "g0.jpg")
        wait_for(lambda: app.store.catalog().get("blue/g0.jpg"), what="moved file in catalog")
        wait_for(lambda: app.serving.version and app.serving.version.number >= 3 or app.trainer.runs >= 2,
                 what="a training run after the move")
        assert tiny.images_embedded == before
    models = tmp_path / "data" / "state" / "models"
    current = (models / "CURRENT").read_text().strip()
    assert (models / current / "labels.txt").read_text().splitlines() == list(version.labels) or int(current) > 2
    metrics = json.loads((models / current / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"train", "validation", "test"}


def test_model_swap_without_restart_keeps_inbox(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path, labels=("red", "blue"))
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
        for i in range(6):
            write_image(data / "classes" / "green" / f"g{i}.jpg", "green", seed=600 + i)
        for i in range(10):
            write_image(data / "inbox" / f"in{i}.jpg", ("red", "blue", "green")[i % 3], seed=700 + i)
        wait_for(lambda: app.serving.version and "green" in app.serving.version.labels, what="3-label model")
        wait_for(lambda: len(results(tmp_path)) == 10, what="all inbox files classified")
    assert sorted(r["file"] for r in results(tmp_path)) == sorted(f"in{i}.jpg" for i in range(10))
    assert list((data / "inbox").iterdir()) == []
