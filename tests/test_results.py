"""The classification record and its inverse: what the journal keeps is what a recovered result becomes."""

from __future__ import annotations

from pathlib import Path

from daemon.results import ClassificationResult


def test_from_record_inverts_record() -> None:
    result = ClassificationResult(
        id="abc", source=Path("/data/inbox/odd-\udcff.jpg"), sha256="0" * 64, top_k=(("cat", 0.9), ("dog", 0.1)),
        model_version=3, backbone="tiny/seed7/v1", time="2026-11-30T01:00:00.000+00:00",
        destination=Path("/data/outbox/cat/odd-\udcff.jpg"), extra={"camera": "front"})
    again = ClassificationResult.from_record(result.record(), result.source, result.destination or Path())
    assert again == result
    assert again.record() == result.record()
