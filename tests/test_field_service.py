"""Field cases of running the service (issue 11): what operators see from outside. Each test names the kind of
fault it covers and makes its input here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.plugin_manager import ISOLATED_HOOKS
from tests.conftest import seed_classes, wait_for
from tests.test_daemon_e2e import scrape

REJECT_REASONS = ("empty", "corrupt", "unsupported", "too_large", "unreadable")  # the README's list
OUTCOMES = ("classified", "review")


def test_every_reason_and_known_label_series_is_exported_at_zero_from_the_start(
    tmp_path: Path, run_app: Any
) -> None:
    """KIND: a counter that has no series until its first increment hides that increment from rate() and
    increase(), so an alert misses the first burst. Every reason of `retraind_rejected_files_total`, every
    known label and outcome of `retraind_classifications_total` (the serving model's labels, once it loads
    or is published), every training result and each isolated plugin hook is exported at 0 from the first
    scrape. (`tests/test_contrib.py` proves with `promtool test rules` that the rejects alert then fires on
    a first burst.)"""
    with run_app() as app:
        first = scrape(app)
        seed_classes(tmp_path)
        wait_for(lambda: app.serving.version, what="first model")
        published = scrape(app)
    assert {reason: first.get(f"retraind_rejected_files_total{{reason={reason}}}") for reason in REJECT_REASONS} \
        == dict.fromkeys(REJECT_REASONS, 0.0)
    assert {k: v for k, v in first.items() if k.startswith("retraind_training_runs_total")} == {
        f"retraind_training_runs_total{{result={r}}}": 0.0 for r in ("failed", "promoted", "rejected")}
    assert first.get("retraind_plugin_errors_total{hook=retraind_on_result,plugin=file_sinks}") == 0.0
    assert all(k.split("hook=")[1].split(",")[0] in ISOLATED_HOOKS
               for k in first if k.startswith("retraind_plugin_errors_total{"))
    assert not any(k.startswith("retraind_classifications_total") for k in first)  # no labels known yet
    assert {k: v for k, v in published.items() if k.startswith("retraind_classifications_total")} == {
        f"retraind_classifications_total{{label={label},outcome={outcome}}}": 0.0
        for label in ("blue", "red") for outcome in OUTCOMES}

    with run_app() as app:  # a restart: the labels of the model loaded from disk are known at once
        restarted = scrape(app)
    assert restarted.get("retraind_classifications_total{label=red,outcome=review}") == 0.0
