"""Failures the daemon logs and survives are also counted, in `retraind_internal_errors_total{where}`, read
through a real scrape: an operator sees them on the dashboard and in an alert, not only in the logs."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.hookspecs import hookimpl
from daemon.metrics import INTERNAL_ERROR_PLACES
from daemon.retrain_policy import RetrainState
from tests.conftest import image_bytes, seed_classes, wait_for, write_image

#: Bytes after a JPEG's end marker: Pillow ignores them; the decoder below fails on them like a buggy plugin.
POISON = b"poison"


class BuggyPlugins:
    """A retrain policy and a decoder with bugs (not bad input: they raise what no contract allows)."""

    def __init__(self) -> None:
        self.policy_calls = 0

    @hookimpl(tryfirst=True)
    def retraind_should_retrain(self, state: RetrainState) -> bool | None:
        self.policy_calls += 1
        raise RuntimeError("policy bug")

    @hookimpl(tryfirst=True)
    def retraind_decode_image(self, data: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray | None:
        if data.endswith(POISON):
            raise RuntimeError("decoder bug")
        return None


def internal_errors(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "retraind_internal_errors"]
    return {s.labels["where"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_survived_failures_are_counted_by_place(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path)
    buggy = BuggyPlugins()
    with run_app(extra=(buggy,)) as app:
        assert app.http is not None
        assert internal_errors(app.http.port) == dict.fromkeys(INTERNAL_ERROR_PLACES, 0.0)  # all there at 0
        wait_for(lambda: app.serving.version, what="a model, trained by the quiet period despite the policy bug")
        (data / "inbox" / "bad.jpg").write_bytes(image_bytes("red", seed=5) + POISON)
        write_image(data / "inbox" / "good.jpg", "blue", seed=6)
        wait_for(lambda: (data / "outbox" / "blue" / "good.jpg").exists(), what="the good file classified")
        port = app.http.port
        wait_for(lambda: internal_errors(port)["pipeline_batch"] >= 1, what="the bad file's failure counted")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/retraind:classify", method="POST",
                                         data=image_bytes("blue", seed=7) + POISON)
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(request, timeout=10)
        answered.value.close()
        assert answered.value.code == 500
        counted = internal_errors(port)
    assert counted["retrain_policy"] >= 1 and buggy.policy_calls >= 1
    assert counted["http_request"] == 1
    assert (data / "inbox" / "bad.jpg").exists()  # kept for a retry, not lost
