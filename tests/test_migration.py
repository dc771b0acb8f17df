"""Serving across a change of backbone id (`daemon/migration.py`): a model published under one preprocessing
version keeps answering HTTP and filing inbox files, decoded with its own version, while the training images are
cached again under the configured version; a model trained on those then replaces it. Real daemons on one data
root, one after the other, the tiny backbone's one network under two ids, real HTTP over loopback."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.app import App
from daemon.backbone import ServedAs
from daemon.cli import main
from daemon.config import load_config
from daemon.export import keras_network
from daemon.hookspecs import hookimpl
from daemon.keras_engine import KerasBackbone
from daemon.oneshot import load_published
from daemon.status import format_status, from_daemon
from plugins.pillow_decoder import retraind_decode_image
from tests.conftest import image_bytes, make_config, seed_classes, wait_for, write_image
from tests.test_cli import write_config
from tests.test_daemon_e2e import results, scrape
from tests.test_http_api import MODEL, b64, call
from tests.test_tfserving import post
from tests.tiny_backbone import TinyBackbonePlugin, build_tiny

JPEG = {"Content-Type": "image/jpeg"}
V1, V2 = "tiny/seed7/v1", "tiny/seed7/v2"


class HeldDecoder:
    """Holds every decoding of preprocessing v2 until `release` is set, then leaves it to the shipped decoder, so
    the test sees the daemon while the re-cache under v2 waits."""

    def __init__(self) -> None:
        self.release = threading.Event()

    @hookimpl(tryfirst=True)
    def retraind_decode_image(self, preprocessing: str) -> None:
        if preprocessing == "v2":
            self.release.wait(timeout=60)


def classify(app: App, data: bytes, path: str = f"{MODEL}:classify") -> Any:
    code, _, body = call(app, "POST", path, data, JPEG)
    assert code == 200, body
    return body


def test_a_model_keeps_serving_while_the_store_is_cached_under_a_new_preprocessing(tmp_path: Path) -> None:
    seed_classes(tmp_path)
    probes = [image_bytes("red", 7001, size=(24, 20)), image_bytes("blue", 7002, size=(24, 20))]  # enlarged
    assert not np.array_equal(*(retraind_decode_image(probes[0], (32, 32), 10**8, v) for v in ("v1", "v2")))
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin("v1"),)) as app:
        wait_for(lambda: app.serving.version, what="model 1")
        before = [classify(app, probe) for probe in probes]
        predicted = post(app, "predict", {"instances": [b64(probe) for probe in probes]})
    assert [answer["model_version"] for answer in before] == [1, 1]

    decoder = HeldDecoder()
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin("v2"), decoder)) as app:
        try:
            during_the_recache(app, tmp_path, probes, (before, predicted), decoder)
        finally:
            decoder.release.set()  # before the daemon stops: its caching thread waits for it


def during_the_recache(app: App, tmp_path: Path, probes: list[bytes], answers: tuple[list[Any], Any],
                       decoder: HeldDecoder) -> None:
    """Model 1 (v1) answers (`answers`: its `:classify` and `:predict` answers before) and files while the
    re-cache under v2 is held; model 2 (v2) after it."""
    before, predicted = answers
    version = app.serving.version
    assert version is not None and (version.number, version.backbone) == (1, V1)
    assert call(app, "GET", "/readyz")[0] == 200
    assert [classify(app, probe) for probe in probes] == before  # the same top-1 and scores
    assert post(app, "predict", {"instances": [b64(probe) for probe in probes]}) == predicted  # TF Serving's too
    inbox_file = write_image(tmp_path / "data" / "inbox" / "during.jpg", "red", seed=7003)
    filed = wait_for(lambda: [r for r in results(tmp_path) if r["file"] == inbox_file.name],
                     what="the inbox file filed during the re-cache")
    assert filed[0]["model_version"] == 1 and filed[0]["backbone"] == V1
    samples = scrape(app)
    assert samples[f"retraind_migration_info{{serving=true,source={V1},target={V2}}}"] == 1
    assert samples["retraind_migration_images{state=total}"] == 24
    assert samples["retraind_migration_images{state=cached}"] < 24
    status = from_daemon(dataclasses.replace(app.config, http=dataclasses.replace(
        app.config.http, port=app.http.port)))  # type: ignore[union-attr]
    assert status["migration"] == {"source": V1, "target": V2, "serving": True, "total": 24,
                                   "cached": samples["retraind_migration_images{state=cached}"]}
    assert "training images cached under tiny/seed7/v2" in format_status(status)
    runs = app.trainer.runs
    code, _, body = call(app, "POST", f"{MODEL}:retrain", b"{}", {"Content-Type": "application/json"})
    assert code == 202, body
    time.sleep(1.0)  # the trainer looks every 0.25 s: a forced run waits for the re-cache too
    assert app.trainer.runs == runs and app.serving.version.number == 1  # no head on part of the set

    decoder.release.set()
    wait_for(lambda: app.serving.version and app.serving.version.number == 2, timeout=60,
             what="model 2, trained on the re-cached images")
    assert app.serving.version.backbone == V2
    assert app.store.count_cached(V2) == (24, 24)
    wait_for(lambda: app.store.count_bottlenecks(V1) == 0, what="the v1 bottlenecks dropped")
    assert not any(name.startswith("retraind_migration") for name in scrape(app))
    after = classify(app, probes[0])
    assert after["model_version"] == 2 and after["predictions"][0]["top_k"][0]["label"] == "red"
    # the old version stays addressable, decoded as it was trained
    assert classify(app, probes[0], f"{MODEL}/versions/1:classify") == before[0]


def test_a_model_of_another_network_is_not_served_and_the_migration_is_shown(tmp_path: Path) -> None:
    """No second network is built: a model of another one waits for its successor (nothing served)."""
    seed_classes(tmp_path)
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin("v1"),)) as app:
        wait_for(lambda: app.serving.version, what="model 1")
    other = TinyBackbonePlugin()
    other.backbone = build_tiny()
    other.backbone.id = "tiny/seed8/v1"  # as if other weights: another network
    with App(make_config(tmp_path), extra_plugins=(other,)) as app:
        assert app.serving.version is None and call(app, "GET", "/readyz")[0] == 503
        samples = scrape(app)
        assert samples[f"retraind_migration_info{{serving=false,source={V1},target=tiny/seed8/v1}}"] == 1
        wait_for(lambda: app.serving.version, timeout=60, what="model 2")
        assert (app.serving.version.number, app.serving.version.backbone) == (2, "tiny/seed8/v1")


def test_the_one_shot_commands_run_a_model_of_another_preprocessing_version(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """KIND: the commands that run the published model without a daemon refused a model the daemon serves.
    After an upgrade (a store of v1, the config building v2) `retraind classify` exited 78 with `set
    backbone.name/weights to match`, which no setting can do, and so did `bulk classify` and `export`, until
    the daemon had re-cached every training image. INPUT: a model under `tiny/seed7/v1`, the configured backbone
    `tiny/seed7/v2` (one network); `classify` and a bulk worker give the daemon's own answer for a picture whose
    v1 and v2 pixels differ, and the export takes the network itself."""
    seed_classes(tmp_path)
    probe = tmp_path / "probe.jpg"
    probe.write_bytes(image_bytes("red", 7001, size=(24, 20)))  # enlarged to the input: v1 and v2 pixels differ
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin("v1"),)) as app:
        wait_for(lambda: app.serving.version, what="model 1")
        (answer,) = classify(app, probe.read_bytes())["predictions"]
    config = write_config(tmp_path)

    assert main(["--config", str(config), "classify", str(probe)], plugins=[TinyBackbonePlugin("v2")]) == 0
    printed = "".join(f"\n  {top['label']} (score = {top['score']:.5f})" for top in answer["top_k"])
    assert capsys.readouterr().out == f"{probe}:{printed}\n"

    pa = pytest.importorskip("pyarrow")
    from daemon.bulk import BulkWorker
    from daemon.bulk_sources import list_sources
    loaded = load_config(config)
    model = load_published(loaded, [TinyBackbonePlugin("v2")])
    assert model.backbone.id == V1 and isinstance(keras_network(ServedAs(build_tiny("v2"), V1)), KerasBackbone)
    worker = BulkWorker(loaded, [TinyBackbonePlugin("v2")], 1, model.version)
    listed = list_sources([str(probe)], lambda rel: True)
    (line,) = worker(pa.Table.from_pylist([dataclasses.asdict(f) for f in listed]))["record"].to_pylist()
    record = json.loads(line)
    assert record["backbone"] == V1 and record["top_k"] == answer["top_k"]
