"""Trustworthy filing through the real daemon (tiny backbone): calibrated scores and derived thresholds per
model version, untaught images sent to review as `unfamiliar`, and the review loop teaching a new label."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

from daemon.status import format_status, from_daemon
from daemon.trust import OUT_OF_FOLD_FILE, UNFAMILIAR
from tests.conftest import seed_classes, wait_for, write_image
from tests.test_daemon_e2e import get, results, scrape

DERIVED = {"confidence_threshold": None, "novelty": True}  # the shipped defaults, not the plumbing tests' ones
KNOWN = ("red", "blue", "green")


def daemon_status(app: Any) -> str:
    """`retraind status` as the CLI prints it, asked of the running daemon over HTTP."""
    return format_status(from_daemon(dataclasses.replace(app.config, http=dataclasses.replace(
        app.config.http, port=app.http.port))))


def trained_on(app: Any, images: int) -> Any:
    """The serving version once it was trained on `images` images (the first may come before all are cached)."""
    version = app.serving.version
    counts = version.metrics["images"].values() if version else []
    return version if sum(sum(split.values()) for split in counts) == images else None


def test_untaught_images_go_to_review_and_teach_a_new_label(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path, per_label=30, labels=KNOWN)
    with run_app(classify=DERIVED) as app:
        version = wait_for(lambda: trained_on(app, 90), what="a model of all 90 images")
        trust = version.metrics["trust"]
        assert trust["target_precision"] == 0.9 and trust["reason"] is None
        assert 0 < trust["confidence_threshold"] <= 1 and trust["expected_coverage"] >= 0.75
        assert trust["calibration"]["out_of_fold"]["after"] is not None and trust["novelty"]["threshold"] > 0
        oof = [json.loads(line) for line in (version.directory / OUT_OF_FOLD_FILE).read_text().splitlines()]
        assert len(oof) == 90 and {row["label"] for row in oof} == set(KNOWN)
        assert all(len(row["sha256"]) == 64 and 0 < row["probability"] <= 1 for row in oof)

        for i in range(8):
            write_image(data / "inbox" / f"known-{KNOWN[i % 3]}-{i}.jpg", KNOWN[i % 3], seed=5000 + i)
            write_image(data / "inbox" / f"untaught-{i}.jpg", "yellow", seed=6000 + i)
        wait_for(lambda: len(results(tmp_path)) == 16, what="16 results")
        by_file = {r["file"]: r for r in results(tmp_path)}
        known = [r for name, r in by_file.items() if name.startswith("known")]
        untaught = [r for name, r in by_file.items() if name.startswith("untaught")]
        filed_right = [r for r in known if r["review_reason"] is None and r["file"].split("-")[1] == r["label"]]
        unfamiliar = [r for r in untaught if r["review_reason"] == UNFAMILIAR]
        assert len(filed_right) >= 6, known
        assert len(unfamiliar) >= 6, untaught
        for record in by_file.values():
            assert isinstance(record["novelty"], float) and 0 < record["confidence"] <= 1
            assert Path(record["destination"]).parent == (
                data / "review" if record["review_reason"] else data / "outbox" / record["label"])
        reviews = f"retraind_reviews_total{{reason={UNFAMILIAR}}}"  # counted just after the record is written
        metrics = wait_for(lambda: (m := scrape(app)).get(reviews) == len(unfamiliar) and m, what="review count")
        assert metrics["retraind_model_expected_coverage_ratio"] == trust["expected_coverage"]
        assert metrics["retraind_model_filing_suspended"] == 0
        status = daemon_status(app)
        assert "target precision 90.0%" in status and "class_mahalanobis, review above" in status
        assert "(leave-one-class-out Youden's J)" in status and trust["novelty"]["rule"] == "youden"

        # the review loop: the unfamiliar images, moved into classes/yellow/, teach a fourth label
        (data / "classes" / "yellow").mkdir()
        for record in unfamiliar:
            moved = Path(record["destination"])
            shutil.move(moved, data / "classes" / "yellow" / moved.name)
        taught = wait_for(lambda: (v := app.serving.version) and "yellow" in v.labels and v, what="a yellow model")
        assert taught.metrics["trust"]["novelty"]["threshold"] > 0
        write_image(data / "inbox" / "new-yellow.jpg", "yellow", seed=7000)
        wait_for(lambda: len(results(tmp_path)) == 17, what="the 17th result")
    last = results(tmp_path)[-1]
    assert last["file"] == "new-yellow.jpg" and last["label"] == "yellow" and last["review_reason"] != UNFAMILIAR


def _classify_known(app: Any, tmp_path: Path, first_seed: int) -> list[dict[str, Any]]:
    """12 new images of the known classes through the inbox; their result records."""
    done = len(results(tmp_path))
    for i in range(12):
        write_image(tmp_path / "data" / "inbox" / f"known-{KNOWN[i % 3]}-{first_seed + i}.jpg", KNOWN[i % 3],
                    seed=first_seed + i)
    wait_for(lambda: len(results(tmp_path)) == done + 12, what="12 more results")
    return results(tmp_path)[done:]


def test_novelty_false_alarm_rate_sends_that_share_of_known_images_to_review(tmp_path: Path, run_app: Any) -> None:
    """Youden's J files these known images; restarted with a false-alarm rate of 0.5, the daemon retrains and
    sends about half of the next ones to review as `unfamiliar`, at the threshold the out-of-fold scores give."""
    seed_classes(tmp_path, per_label=30, labels=KNOWN)
    with run_app(classify=DERIVED) as app:
        youden = wait_for(lambda: trained_on(app, 90), what="a model of all 90 images")
        assert youden.metrics["trust"]["novelty"]["rule"] == "youden"
        before = _classify_known(app, tmp_path, 5000)
    with run_app(classify={**DERIVED, "novelty_false_alarm_rate": 0.5}) as app:
        version = wait_for(lambda: (v := app.serving.version) and v.number > youden.number and v,
                           what="a model fitted at the new rate")
        novelty = version.metrics["trust"]["novelty"]
        oof = sorted(json.loads(line)["novelty"] for line in (version.directory / OUT_OF_FOLD_FILE).read_text().splitlines())
        assert (novelty["rule"], novelty["false_alarm_rate"]) == ("false_alarm_rate", 0.5)
        assert math.isclose(novelty["threshold"], oof[math.ceil(91 * 0.5) - 1], rel_tol=1e-3)  # the 46th of 90
        after = _classify_known(app, tmp_path, 5100)
        assert "(false-alarm rate 50.0% of known images)" in daemon_status(app)
        code, meta = get(app, "/v1/models/retraind/metadata")
    assert code == 200 and meta["trust"]["novelty"]["false_alarm_rate"] == 0.5
    unfamiliar = [r for r in after if r["review_reason"] == UNFAMILIAR]
    assert sum(r["review_reason"] == UNFAMILIAR for r in before) <= 1 and 3 <= len(unfamiliar) <= 10, (before, after)
    assert all((r["novelty"] > novelty["threshold"]) == (r in unfamiliar) for r in after)


def test_too_few_images_send_everything_to_review_and_say_why(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path, per_label=8)
    with run_app(classify=DERIVED) as app:
        version = wait_for(lambda: trained_on(app, 16), what="a model of all 16 images")
        trust = version.metrics["trust"]
        assert trust["confidence_threshold"] is None and "no review threshold reaches precision 90%" in trust["reason"]
        write_image(data / "inbox" / "sure-red.jpg", "red", seed=4242)
        wait_for(lambda: results(tmp_path), what="a result")
        metrics = scrape(app)
        status = daemon_status(app)
    (record,) = results(tmp_path)
    assert record["review_reason"] == "low_confidence" and (data / "review" / "sure-red.jpg").exists()
    assert metrics["retraind_model_filing_suspended"] == 1
    assert "filing:        suspended: no review threshold reaches precision 90%" in status
