"""Trustworthy filing through a real daemon with the shipped `classify` settings: calibrated scores, the review
threshold derived from `classify.target_precision`, and the novelty gate.

The known classes' images (default: animals, food, plants, vehicles) are taught except every 5th, which is held
out; when the model trained on all taught images is serving, the held-out images and every image of the
untaught classes (household, town) are renamed into inbox/. Printed from the result records: known-class
filed precision and coverage, the share of untaught images filed, the expected calibration error of the
filed images' scores, and the novelty score's AUROC (known held-out vs untaught) beside max-softmax's.
Targets (issue 15): precision >= 0.9 at coverage >= 0.75, untaught filed <= 10%, ECE of filed <= 0.05,
novelty AUROC >= max-softmax AUROC.

Usage: python bench/trust.py [--known animals,food,plants,vehicles] [--backbone efficientnet_lite0]"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import harness
import numpy as np

from daemon.app import App
from daemon.calibration import binned_calibration_error
from daemon.novelty import auroc
from plugins.file_sinks import RESULTS_FILE


def _plan(data: Path, known: list[str]) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(label, path) of the images to teach, and of those to classify (held-out known, all untaught)."""
    teach, classify = [], []
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in harness.IMAGE_SUFFIXES)
        for i, path in enumerate(images):
            (teach if folder.name in known and i % 5 != 4 else classify).append((folder.name, path))
    return teach, classify


def _trained_on(app: App, images: int) -> Any:
    version = app.serving.version
    counts = version.metrics["images"].values() if version else []
    return version if sum(sum(split.values()) for split in counts) == images else None


def _records(root: Path) -> list[dict[str, Any]]:
    path = root / RESULTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    args = harness.arguments(__doc__, known="animals,food,plants,vehicles").parse_args()
    known = args.known.split(",")
    harness.header("trust", data=args.data, known=args.known, backbone=args.backbone)
    teach, classify = _plan(args.data, known)
    with harness.scratch("trust") as root:
        config = harness.daemon_config(root, args.cache, args.backbone, training={"quiet_period_seconds": 2})
        for label, path in teach:
            (root / "classes" / label).mkdir(parents=True, exist_ok=True)
            (root / "classes" / label / path.name).write_bytes(path.read_bytes())
        with App(config) as app:
            version = harness.wait_until(lambda: _trained_on(app, len(teach)), 1800, "the model of all taught images")
            version = app.serving.version
            inbox, staging = root / "inbox", root / "staging"
            staging.mkdir()
            for i, (label, path) in enumerate(classify):
                name = f"{label}__{i}{path.suffix}"  # the true label travels in the name
                (staging / name).write_bytes(path.read_bytes())
                os.replace(staging / name, inbox / name)
            harness.wait_until(lambda: len(_records(root)) >= len(classify), 1800, "every result record", poll=0.2)
        records = _records(root)
    assert version is not None
    _print(version.metrics["trust"], records, known, len(teach))


def _print(trust: dict[str, Any], records: list[dict[str, Any]], known: list[str], taught: int) -> None:
    truth = [r["file"].split("__")[0] for r in records]
    is_known = np.array([t in known for t in truth])
    filed = np.array([r["review_reason"] is None for r in records])
    right = np.array([r["label"] == t for r, t in zip(records, truth)])
    confidence = np.array([r["confidence"] for r in records])
    novelty = np.array([r["novelty"] for r in records])
    unfamiliar = np.array([r["review_reason"] == "unfamiliar" for r in records])
    calibration = trust["calibration"]
    harness.note(f"taught {taught} images; classified {is_known.sum()} held-out known, {(~is_known).sum()} untaught")
    harness.note(f"model: review below calibrated score {trust['confidence_threshold']} for target precision "
                 f"{trust['target_precision']}, expected coverage {trust['expected_coverage']}, temperature "
                 f"{calibration['parameters']}, novelty threshold {trust['novelty']['threshold']:.4g}")
    harness.emit("known.filed_precision", float(right[is_known & filed].mean()), "ratio")
    harness.emit("known.coverage", float(filed[is_known].mean()), "ratio")
    harness.emit("known.expected_coverage", float(trust["expected_coverage"]), "ratio")
    harness.emit("known.unfamiliar", float(unfamiliar[is_known].mean()), "ratio")
    harness.emit("untaught.filed", float(filed[~is_known].mean()), "ratio")
    harness.emit("untaught.unfamiliar", float(unfamiliar[~is_known].mean()), "ratio")
    for name, rows in (("filed_known", is_known & filed), ("filed_all", filed), ("known_all", is_known)):
        ece = binned_calibration_error(confidence[rows], right[rows])
        harness.emit(f"ece.{name}", float(ece or 0.0), "ratio")
    for split in ("out_of_fold", "test"):
        pair = calibration[split]
        if pair["before"] is not None:
            harness.emit(f"ece.model_{split}.calibrated", pair["after"], "ratio",
                         ratio=pair["after"] / pair["before"] if pair["before"] else None, vs="raw softmax")
    novelty_auroc = auroc(novelty[is_known], novelty[~is_known]) or 0.0
    softmax_auroc = auroc(-confidence[is_known], -confidence[~is_known]) or 0.0
    harness.emit("auroc.max_softmax", softmax_auroc, "ratio")
    harness.emit("auroc.novelty", novelty_auroc, "ratio", ratio=novelty_auroc / softmax_auroc, vs="max-softmax")


if __name__ == "__main__":
    main()
