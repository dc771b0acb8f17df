"""Default routing and result sinks: `outbox/<label>/` or `review/`, a sidecar record, and `results.jsonl`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from daemon.atomic import write_atomic
from daemon.config import Config
from daemon.hookspecs import hookimpl
from daemon.results import ClassificationResult

RESULTS_FILE = "results.jsonl"
_TAIL_BYTES = 1 << 20


@hookimpl(trylast=True)
def retraind_route_result(result: ClassificationResult, config: Config) -> Path:
    if result.confidence < config.classify.confidence_threshold:
        return config.folder("review")
    return config.folder("outbox") / result.label


@hookimpl
def retraind_on_result(result: ClassificationResult, config: Config) -> None:
    """Write `<image>.json` beside the moved image and append one line to `results.jsonl` (once per id)."""
    assert result.destination is not None
    line = json.dumps(result.record(), ensure_ascii=False)
    write_atomic(result.destination.with_name(result.destination.name + ".json"), line.encode())
    results = config.data_root / RESULTS_FILE
    if _already_appended(results, result.id):
        return
    with results.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _already_appended(results: Path, result_id: str) -> bool:
    """After a crash a sink may run twice for one id; the line, if written, is near the end of the file."""
    try:
        with results.open("rb") as fh:
            fh.seek(max(0, results.stat().st_size - _TAIL_BYTES))
            return f'"id": "{result_id}"'.encode() in fh.read()
    except FileNotFoundError:
        return False
