"""Continuous publishing: a promoted version appears whole in a TF Serving base path and a Triton model repository;
the published SavedModel, loaded in a fresh process, gives the daemon's top-1; `config.pbtxt` parses with
Triton's own model-config protobuf and names the SavedModel's signature; a failed export is counted and retried
and never holds up promotion; only `training.keep_versions` versions stay."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon import publish
from tests.conftest import image_bytes, seed_classes, wait_for, write_image
from tests.test_export import KerasTiny

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient (test extra)")

LOADER = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    signature = model.signatures["serving_default"]
    data = tf.constant([open(f, "rb").read() for f in json.loads(sys.argv[2])])
    probabilities = signature(image_bytes=data)["probabilities"].numpy()
    (inputs,) = signature.structured_input_signature[1].values()
    outputs = {name: spec.dtype.name for name, spec in signature.structured_outputs.items()}
    print(json.dumps({"top1": probabilities.argmax(axis=1).tolist(), "input": [inputs.name, inputs.dtype.name],
                      "outputs": outputs}))
""")


def published(root: Path, number: int) -> bool:
    return (root / "tf" / "retraind" / str(number) / "saved_model.pb").is_file() and \
        (root / "triton" / "retraind" / str(number) / "model.savedmodel" / "saved_model.pb").is_file()


def test_every_promotion_is_published_to_tf_serving_and_triton(tmp_path: Path, run_app: Any,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="daemon")
    seed_classes(tmp_path)
    files = {f"{colour}.png": image_bytes(colour, 300 + i, "PNG") for i, colour in enumerate(("red", "blue"))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    targets = {"tf_serving_base_path": str(tmp_path / "tf"), "triton_model_repository": str(tmp_path / "triton"),
               "max_batch_size": 8}
    with run_app(extra=(KerasTiny(),), publish=targets) as app:
        version = wait_for(lambda: app.serving.version, what="first model")
        wait_for(lambda: published(tmp_path, version.number), timeout=120, what="model 1 in both repositories")
        tops = app.serving.top_k(version, app.extractor.embed(np.stack(
            [app.extractor.decode(data) for data in files.values()])), 1)
        for repository in ("tf_serving", "triton"):
            assert app.metrics.registry.get_sample_value(
                "retraind_published_model_version", {"repository": repository}) == version.number
    tf_version = tmp_path / "tf" / "retraind" / "1"
    lines = [r.getMessage() for r in caplog.records if r.name in ("daemon.publish", "daemon.trainer")]
    assert any(re.fullmatch(rf"model 1 published to tf_serving \({re.escape(str(tf_version))}\) and triton "
                            rf"\({re.escape(str(tmp_path / 'triton' / 'retraind' / '1'))}\), \d+\.\d s after its "
                            r"promotion", line) for line in lines), lines
    promoted = next(line for line in lines if line.startswith("model 1 published: "))
    assert re.search(r"accuracy train \d\.\d{3}, validation \d\.\d{3}", promoted), promoted
    assert not any(c in line for line in lines for c in "{}[]"), "a raw dict or list in a log line"
    assert sorted(p.name for p in (tmp_path / "tf" / "retraind").iterdir()) == ["1"], "no temporary folders left"
    assert (tf_version / "assets" / "labels.txt").read_text().splitlines() == list(version.labels)

    config = text_format.Parse((tmp_path / "triton" / "retraind" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("retraind", "tensorflow_savedmodel", 8)
    assert config.HasField("dynamic_batching")
    (given,) = config.input
    (produced,) = config.output
    assert given.data_type == model_config_pb2.TYPE_STRING and list(given.dims) == [1]
    assert given.HasField("reshape") and list(given.reshape.shape) == []
    assert produced.data_type == model_config_pb2.TYPE_FP32 and list(produced.dims) == [-1]

    paths = json.dumps([str(tmp_path / name) for name in files])
    for saved_model in (tf_version, tmp_path / "triton" / "retraind" / "1" / "model.savedmodel"):
        done = subprocess.run([sys.executable, "-c", LOADER, str(saved_model), paths], capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        loaded = json.loads(done.stdout.splitlines()[-1])
        assert [version.labels[i] for i in loaded["top1"]] == [top[0][0] for top in tops]
        assert loaded["input"] == [given.name, "string"] and loaded["outputs"] == {produced.name: "float32"}


def test_a_failed_export_is_counted_retried_and_blocks_nothing(tmp_path: Path, run_app: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish, "_RETRY_FIRST_SECONDS", 0.2)
    seed_classes(tmp_path, per_label=6)
    (tmp_path / "tf").write_text("a file where the base path's folder should be")
    targets = {"tf_serving_base_path": str(tmp_path / "tf"), "triton_model_repository": str(tmp_path / "triton")}
    with run_app(extra=(KerasTiny(),), publish=targets, training={"keep_versions": 1}) as app:
        wait_for(lambda: app.serving.version, what="first model, promoted although its export fails")
        failures = {"repository": "tf_serving"}
        wait_for(lambda: app.metrics.registry.get_sample_value("retraind_publish_failures_total", failures),
                 timeout=120, what="a counted export failure")
        assert not (tmp_path / "triton" / "retraind" / "1").exists() or \
            (tmp_path / "triton" / "retraind" / "1" / "model.savedmodel" / "saved_model.pb").is_file()
        (tmp_path / "tf").unlink()  # the operator fixes the path: the retry publishes
        wait_for(lambda: published(tmp_path, 1), timeout=120, what="model 1 after the retry")

        write_image(tmp_path / "data" / "classes" / "green" / "g-0.jpg", "green", seed=5)
        write_image(tmp_path / "data" / "classes" / "green" / "g-1.jpg", "green", seed=6)
        wait_for(lambda: published(tmp_path, 2), timeout=120, what="model 2 in both repositories")
        assert app.serving.version is not None and app.serving.version.number == 2
    for models in (tmp_path / "tf" / "retraind", tmp_path / "triton" / "retraind"):
        assert sorted(p.name for p in models.iterdir() if p.is_dir()) == ["2"], "training.keep_versions is 1"
