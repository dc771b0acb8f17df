"""Label folders and the promotion gate, through a real daemon: the model follows label folders that are
emptied, deleted, added, tiny or differ only in case; a model with another label set is another task and is
never gated against the old one; a worse head is not promoted and a failing training leaves the model serving."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from daemon.app import App
from daemon.config import TrainingConfig
from daemon.dataset import Dataset
from daemon.head import Head
from daemon.hookspecs import hookimpl
from daemon.trust import FOLDS
from plugins.softmax_head import retraind_train_head as fit_softmax
from tests.conftest import seed_classes, wait_for, write_image
from tests.test_daemon_e2e import results, scrape
from tests.test_reliability_input import encoded, pixels
from tests.test_review import in_review, post

YELLOW, DARK_GREEN = (230, 220, 30), (20, 110, 40)


def labels_become(app: App, labels: tuple[str, ...]) -> Any:
    version = app.serving.version
    return version if version is not None and version.labels == labels else None


def test_model_follows_label_folders(tmp_path: Path, run_app: Any) -> None:
    classes, inbox = tmp_path / "data" / "classes", tmp_path / "data" / "inbox"
    seed_classes(tmp_path, per_label=8, labels=("red", "blue", "green"))
    with run_app(classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: labels_become(app, ("blue", "green", "red")), what="three labels")

        for image in (classes / "green").iterdir():  # emptied: the folder stays, its images go
            image.unlink()
        emptied = wait_for(lambda: labels_become(app, ("blue", "red")), what="the emptied label to go")

        for i in range(6):  # "Red" is not "red": a label of its own, with a colour of its own
            (classes / "Red").mkdir(exist_ok=True)
            (classes / "Red" / f"dark-{i}.png").write_bytes(encoded(pixels(DARK_GREEN, 800 + i), "PNG"))
        (classes / "solo").mkdir()
        (classes / "solo" / "only.png").write_bytes(encoded(pixels(YELLOW, 900), "PNG"))
        grown = wait_for(lambda: labels_become(app, ("Red", "blue", "red", "solo")), what="case and solo labels")
        (inbox / "dark.png").write_bytes(encoded(pixels(DARK_GREEN, 850), "PNG"))
        write_image(inbox / "bright.jpg", "red", seed=851)
        wait_for(lambda: len(results(tmp_path)) == 2, what="two classifications")

        shutil.rmtree(classes / "Red")  # deleted: the folder and its images go
        deleted = wait_for(lambda: labels_become(app, ("blue", "red", "solo")), what="the deleted label to go")

        write_image(classes / "red" / "one-more.jpg", "red", seed=950)  # same labels: this one is gated
        same_task = wait_for(lambda: app.serving.version.number > deleted.number and app.serving.version,
                             what="a retrain on the same labels")
    by_file = {r["file"]: r for r in results(tmp_path)}
    assert by_file["dark.png"]["label"] == "Red" and by_file["bright.jpg"]["label"] == "red"
    assert Path(by_file["dark.png"]["destination"]).parent.name == "Red"
    assert Path(by_file["bright.jpg"]["destination"]).parent.name == "red"
    models = tmp_path / "data" / "state" / "models"
    for version in (emptied, grown, deleted):  # another label set: never compared with the old model
        assert "gate" not in json.loads((models / str(version.number) / "metrics.json").read_text())
        assert (models / str(version.number) / "labels.txt").read_text().splitlines() == list(version.labels)
    assert grown.metrics["images"]["solo"]["train"] == 1  # a single image trains, whatever its split
    assert json.loads((models / str(same_task.number) / "metrics.json").read_text())["gate"][
        "previous_version"] == deleted.number


class Sabotage:
    """A head trainer registered through the real hook: defers to the built-in, trains a head that picks the
    least likely label (worse than any trained head), or crashes."""

    def __init__(self) -> None:
        self.mode = "defer"

    @hookimpl(tryfirst=True)
    def retraind_train_head(self, dataset: Dataset, config: TrainingConfig) -> Head | None:
        if self.mode == "raise":
            raise RuntimeError("the trainer crashed")
        if self.mode == "worse":
            good = fit_softmax(dataset, config)
            return Head(-good.weights, -good.bias, {"trainer": "worse"}, {})
        return None


def runs(app: App) -> dict[str, float]:
    metrics = scrape(app)
    return {r: metrics[f"retraind_training_runs_total{{result={r}}}"] for r in ("promoted", "rejected", "failed")}


def test_gate_and_failed_training(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    sabotage = Sabotage()
    seed_classes(tmp_path, per_label=12)
    with run_app(extra=(sabotage,)) as app:
        first = wait_for(lambda: app.serving.version, what="first model")
        wait_for(lambda: app.trainer.runs == 1, what="the first run to finish")

        sabotage.mode = "worse"
        app.trainer.request()
        wait_for(lambda: app.trainer.runs == 2, what="the worse run")
        assert runs(app) == {"promoted": 1, "rejected": 1, "failed": 0}
        assert app.serving.version is first and app.registry.versions() == [first.number]

        sabotage.mode = "raise"
        app.trainer.request()
        wait_for(lambda: app.trainer.runs == 3, what="the failing run")
        assert runs(app) == {"promoted": 1, "rejected": 1, "failed": 1}
        assert app.serving.version is first and app.alive()
        write_image(data / "inbox" / "still-served.jpg", "blue", seed=5)
        wait_for(lambda: results(tmp_path), what="a classification by the model still serving")
        assert results(tmp_path)[0]["model_version"] == first.number

        sabotage.mode = "worse"  # a new label: another task, so even a worse head is not held back
        for i in range(8):
            write_image(data / "classes" / "green" / f"green-{i}.jpg", "green", seed=60 + i)
        other_task = wait_for(lambda: labels_become(app, ("blue", "green", "red")), what="a three-label model")
        assert runs(app)["promoted"] == 2 and other_task.metrics["accuracy"]["train"] < 0.5
    assert "gate" not in other_task.metrics
    assert int((data / "state" / "models" / "CURRENT").read_text()) == other_task.number


class FailsOnce:
    """Training breaks once (a full disk, a plugin's bug); the next run defers to the built-in trainer."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def retraind_train_head(self, dataset: object, config: object) -> None:
        self.calls += 1
        if self.calls == 1:
            raise OSError(28, "No space left on device")


def test_failed_training_is_retried_without_a_new_change(tmp_path: Path, run_app: Any) -> None:
    seed_classes(tmp_path)
    flaky = FailsOnce()
    with run_app(extra=(flaky,)) as app:
        wait_for(lambda: app.serving.version, timeout=40, what="a model after the retry")
        failed = app.metrics.training_runs.labels(result="failed")._value.get()
    assert flaky.calls == 2 + FOLDS and failed == 1  # the failed run; the next: its head, the out-of-fold heads


@pytest.mark.parametrize("name", ["two\nlines", "two\u2028lines", "two\x85lines"])
def test_a_label_folder_with_a_control_character_is_skipped(tmp_path: Path, run_app: Any,
                                                             caplog: pytest.LogCaptureFixture, name: str) -> None:
    """KIND: a label folder whose name holds a line break or another control character (Linux allows it;
    the review API made one from `{"label": "a\\nb"}`). `labels.txt` has one label per line, so such a label
    split in two: the next start could not load the model (`head has 3 outputs for 4 labels`) and the
    exported labels were shifted. Python reads `labels.txt` by `splitlines()`, which also breaks at Unicode's
    line and paragraph separators (U+2028, U+2029, pasted from web pages) and at C1 controls (NEL, U+0085):
    those split a label just the same. INPUT: images in `classes/two\\nlines/` (and the others); they are
    skipped with a warning naming the folder, the model has the other labels, and a restart loads it."""
    seed_classes(tmp_path)
    odd = tmp_path / "data" / "classes" / name
    for i in range(3):
        write_image(odd / f"g{i}.jpg", "green", seed=700 + i)
    with caplog.at_level(logging.WARNING, logger="daemon.indexer"), run_app() as app:
        version = wait_for(lambda: app.serving.version, what="first model")
    assert version.labels == ("blue", "red")
    warned = [r.getMessage() for r in caplog.records if "control character" in r.getMessage()]
    assert f"{odd / 'g0.jpg'}: skipped for training: the label folder name {name!r} has a control character " \
        "or a line separator; rename the folder" in warned
    with run_app() as app:
        assert app.serving.version is not None and app.serving.version.labels == ("blue", "red")


def test_a_store_from_before_the_control_character_rule_is_mended(tmp_path: Path, run_app: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same kind in a store written before the rule: its catalog still lists the files of
    `classes/two\nlines/` (unchanged, so no scan looked at them again), and every model kept the label. INPUT:
    a first run without the rule (as the older version ran), then a run with it: the rows are dropped and
    the next model has the other labels only."""
    seed_classes(tmp_path)
    odd = tmp_path / "data" / "classes" / "two\nlines"
    for i in range(3):
        write_image(odd / f"g{i}.jpg", "green", seed=710 + i)
    with monkeypatch.context() as older:
        older.setattr("daemon.indexer.label_problem", lambda label: None)
        older.setattr("daemon.scanner.label_problem", lambda label: None)
        with run_app() as app:
            assert wait_for(lambda: app.serving.version, what="first model").labels == ("blue", "red", "two\nlines")
    with run_app() as app:
        wait_for(lambda: labels_become(app, ("blue", "red")), what="a model without the odd label")
        assert not [rel for rel in app.store.catalog() if rel.startswith("two")]


def test_a_label_spelt_in_two_unicode_normal_forms_is_one_label(tmp_path: Path, run_app: Any) -> None:
    """KIND: the same folder name in two Unicode normal forms. macOS writes names decomposed (NFD: `e` and a
    combining accent), Linux and Windows tools usually composed (NFC), so `café/` copied from a Mac beside a
    `café/` made here are two folders that look the same; each became its own label, two identical names in
    `labels.txt`, the model split between them. INPUT: `classes/café/` in both forms; one label `café` (NFC)
    is trained on the images of both, and a review decision typed in NFD goes into an existing folder."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    seed_classes(tmp_path, per_label=8)
    classes = tmp_path / "data" / "classes"
    for i, spelling in enumerate((composed, decomposed) * 4):
        write_image(classes / spelling / f"c{i}.jpg", "green", seed=800 + i)
    with run_app(classify={"confidence_threshold": 1.0}) as app:
        version = wait_for(lambda: labels_become(app, ("blue", composed, "red")), what="one label café")
        cafe = [e.label for e in app.store.catalog().values() if e.path.startswith(("caf\u00e9/", "cafe\u0301/"))]
        assert version and cafe == [composed] * 8
        write_image(app.config.folder("inbox") / "late.jpg", "green", seed=900)
        (group,) = in_review(app, 1)["groups"]
        assert post(app, f"/v1/review/{group[0]['id']}:label", {"label": decomposed})[0] == 200
        wait_for(lambda: not any(app.config.folder("review").rglob("late*.jpg")), what="the decision carried out")
    assert sorted(p.name for p in classes.iterdir()) == sorted(["blue", "red", composed, decomposed])
    assert sum(1 for p in classes.rglob("late*.jpg")) == 1
