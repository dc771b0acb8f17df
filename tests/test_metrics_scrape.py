"""Every metric DESIGN.md names, read back through a real scrape of a daemon that trained, classified, hit its
cache and rejected files, and parsed with prometheus_client's own parser."""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from daemon import __version__
from tests.conftest import seed_classes, wait_for, write_image

DESIGN = Path(__file__).resolve().parents[2] / "shared" / "DESIGN.md"

#: DESIGN.md's metrics: family name (as the text format's parser gives it) → (type, label names). The test below keeps this in step with the file.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "retraind_build_info": ("gauge", ("version",)),  # an Info: the text format has it as a gauge
    "retraind_model_info": ("gauge", ("version", "backbone")),
    "retraind_model_version": ("gauge", ()),
    "retraind_images": ("gauge", ("label", "split")),
    "retraind_bottleneck_cache_hits": ("counter", ()),
    "retraind_bottleneck_cache_misses": ("counter", ()),
    "retraind_bottleneck_compute_seconds": ("histogram", ()),
    "retraind_training_runs": ("counter", ("result",)),
    "retraind_training_duration_seconds": ("histogram", ()),
    "retraind_model_accuracy_ratio": ("gauge", ("split",)),
    "retraind_last_training_timestamp_seconds": ("gauge", ()),
    "retraind_classifications": ("counter", ("label", "outcome")),
    "retraind_classification_duration_seconds": ("histogram", ("stage",)),
    "retraind_prediction_confidence": ("histogram", ()),
    "retraind_inbox_pending_files": ("gauge", ()),
    "retraind_rejected_files": ("counter", ("reason",)),
    "retraind_watch_overflows": ("counter", ()),
}


def design_metric_names(text: str) -> set[str]:
    """Sample names in DESIGN.md's Metrics section; `..._misses_total` after `x_cache_hits_total` expands to
    `x_cache_misses_total`."""
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    names: list[str] = []
    for name in re.findall(r"`((?:retraind|\.\.\.)_[a-z_]+)", section):
        if name.startswith("..."):
            suffix = name[4:]
            stem = names[-1].split("_")[: -len(suffix.split("_"))]
            name = "_".join([*stem, suffix])
        names.append(name)
    return set(names)


def sample_name(family: str, kind: str) -> str:
    return f"{family}_total" if kind == "counter" else family


@pytest.mark.skipif(not DESIGN.is_file(), reason="../shared/DESIGN.md is not beside this checkout")
def test_expected_list_is_design_md() -> None:
    assert design_metric_names(DESIGN.read_text(encoding="utf-8")) == {
        sample_name(family, kind) for family, (kind, _) in EXPECTED.items()}


def scrape(port: int, accept: str = "") -> tuple[str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def families_of(text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    (match,) = [s.value for s in samples if s.name == name and s.labels == labels]
    return match


def test_every_design_metric_through_a_real_scrape(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path)
    (data / "classes" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
        shutil.copyfile(data / "classes" / "red" / "red-3.jpg", data / "inbox" / "copy-of-a-training-image.jpg")
        write_image(data / "inbox" / "new-red.jpg", "red", seed=8080)
        (data / "inbox" / "notes.txt").write_text("not an image")
        wait_for(lambda: not any((data / "inbox").iterdir()), what="the inbox to empty")
        assert app.http is not None
        # the gauge is set at the end of the pipeline's turn, after the turn's moves have emptied the folder
        wait_for(lambda: value(families_of(scrape(app.http.port)[1])["retraind_inbox_pending_files"].samples,
                               "retraind_inbox_pending_files") == 0, what="the pending-files gauge to reach 0")
        content_type, text = scrape(app.http.port)
        open_metrics = scrape(app.http.port, "application/openmetrics-text; version=1.0.0")

    assert content_type.startswith("text/plain; version=0.0.4")
    assert open_metrics[0].startswith("application/openmetrics-text") and open_metrics[1].endswith("# EOF\n")
    families = families_of(text)
    for family, (kind, labels) in EXPECTED.items():
        assert family in families, f"{family} is not exported"
        assert families[family].type == kind, family
        for sample in families[family].samples:
            assert set(sample.labels) == set(labels) | ({"le"} if sample.name.endswith("_bucket") else set())
            assert not any(str(tmp_path) in v for v in sample.labels.values()), "a file path as a label value"

    s = {name: family.samples for name, family in families.items()}
    assert value(s["retraind_build_info"], "retraind_build_info", version=__version__) == 1
    assert value(s["retraind_model_info"], "retraind_model_info", version="1", backbone="tiny/seed7/v1") == 1
    assert value(s["retraind_model_version"], "retraind_model_version") == 1
    red = [value(s["retraind_images"], "retraind_images", label="red", split=split) for split in
           ("train", "validation", "test")]
    assert sum(red) == 12  # the broken file is not a training image
    assert value(s["retraind_bottleneck_cache_hits"], "retraind_bottleneck_cache_hits_total") == 1
    assert value(s["retraind_bottleneck_cache_misses"], "retraind_bottleneck_cache_misses_total") == 24 + 1
    assert value(s["retraind_bottleneck_compute_seconds"], "retraind_bottleneck_compute_seconds_count") >= 2
    runs = {result: value(s["retraind_training_runs"], "retraind_training_runs_total", result=result)
            for result in ("promoted", "rejected", "failed")}
    assert runs == {"promoted": 1, "rejected": 0, "failed": 0}
    assert value(s["retraind_training_duration_seconds"], "retraind_training_duration_seconds_count") == 1
    for split in ("train", "validation"):
        assert 0.5 <= value(s["retraind_model_accuracy_ratio"], "retraind_model_accuracy_ratio", split=split) <= 1
    last = value(s["retraind_last_training_timestamp_seconds"], "retraind_last_training_timestamp_seconds")
    assert time.time() - 120 < last <= time.time()
    assert value(s["retraind_classifications"], "retraind_classifications_total", label="red",
                 outcome="classified") == 2
    stages = {sample.labels["stage"] for sample in s["retraind_classification_duration_seconds"]}
    assert "decode" in stages
    assert value(s["retraind_prediction_confidence"], "retraind_prediction_confidence_count") == 2
    assert value(s["retraind_inbox_pending_files"], "retraind_inbox_pending_files") == 0
    rejected = {sample.labels["reason"]: sample.value for sample in s["retraind_rejected_files"]
                if sample.name == "retraind_rejected_files_total"}
    assert rejected.get("unsupported") == 1 and sum(rejected.values()) == 2  # notes.txt, and broken.jpg
    assert value(s["retraind_watch_overflows"], "retraind_watch_overflows_total") == 0
