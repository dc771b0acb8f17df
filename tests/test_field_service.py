"""Field cases of running the service (issue 11): what operators see from outside. Each test names the kind of
fault it covers and makes its input here."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from daemon.app import App
from daemon.instance_lock import AlreadyRunning
from daemon.plugin_manager import ISOLATED_HOOKS
from tests.conftest import make_config, seed_classes, wait_for
from tests.test_daemon_e2e import results, scrape
from tests.test_field_decoding import REPO, free_port, start_child, stop_child
from tests.test_reliability_input import encoded, pixels
from tests.tiny_backbone import TinyBackbonePlugin

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



def test_a_second_daemon_with_its_state_elsewhere_is_refused_too(tmp_path: Path, run_app: Any) -> None:
    """KIND: the one-daemon lock lived only in `folders.state`: a second daemon on the same data root, or on
    the same inbox, whose state folder is elsewhere (a hand-started `retraind run` beside the systemd service,
    which keeps its state in /var/lib/retraind) started, and both took every inbox file. INPUT: while a daemon
    runs, a second one on its data root with another `folders.state`, and a third with another data root and
    state but the first one's inbox; both are refused naming the shared folder, and the first keeps running."""
    data = tmp_path / "data"
    (tmp_path / "b").mkdir()
    with run_app() as app:
        for config, shared in ((make_config(tmp_path, folders={"state": str(tmp_path / "state-b")}), data),
                               (make_config(tmp_path / "b", folders={"inbox": str(data / "inbox")}), data / "inbox")):
            with pytest.raises(AlreadyRunning) as refused, App(config, extra_plugins=(TinyBackbonePlugin(),)):
                pass
            assert str(refused.value).startswith(f"another retraind is running on {shared} "), refused.value
        assert app.pipeline.is_alive()
    with App(make_config(tmp_path, folders={"state": str(tmp_path / "state-b")}), extra_plugins=(TinyBackbonePlugin(),)):
        pass  # once the first has stopped, the folders are free


def test_a_second_daemon_on_the_same_data_root_exits_and_leaves_the_first_alone(tmp_path: Path) -> None:
    """KIND: two daemons on one data root each classify every inbox file (duplicate result lines, moves
    racing) and train on one store. A second `retraind run` on a data root a daemon holds (here with another
    port, and another backbone it never gets to build) exits at once with one line and status 75
    (EX_TEMPFAIL); the first keeps serving and classifies each inbox file exactly once."""
    data = tmp_path / "data"
    for label in ("red", "blue"):
        (data / "classes" / label).mkdir(parents=True)
        for i in range(8):
            (data / "classes" / label / f"{label}-{i}.png").write_bytes(encoded(pixels(label, 70 + i), "PNG"))
    port = free_port()
    first = start_child(tmp_path, port)
    try:
        wait_for(lambda: (data / "state" / "models" / "CURRENT").exists() or first.poll() is not None,
                 timeout=60, what="the first daemon's model")
        (tmp_path / "second.yaml").write_text(f"data_root: {data}\nhttp: {{port: {free_port()}}}\n")
        second = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", "second.yaml"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO)},
                                check=False)
        for i in range(3):
            (data / "inbox" / f"after-{i}.png").write_bytes(encoded(pixels("red", 80 + i), "PNG"))
        wait_for(lambda: len(results(tmp_path)) == 3, what="the first daemon classifying the inbox")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            health = response.status, json.loads(response.read())
        assert first.poll() is None
    finally:
        stop_child(first, tmp_path)
    assert second.returncode == 75, second.stderr
    (line,) = second.stderr.splitlines()
    assert line.startswith("retraind: another retraind (pid ") and str(data) in line, line
    assert health[0] == 200 and health[1]["alive"] is True
    assert sorted(r["file"] for r in results(tmp_path)) == ["after-0.png", "after-1.png", "after-2.png"]
    assert "ERROR" not in (tmp_path / "child.log").read_text()
