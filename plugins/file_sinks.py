"""Default routing and result sinks: `outbox/<label>/` or `review/`, a sidecar record, and `results.jsonl`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from daemon.atomic import sync_file, write_atomic
from daemon.config import Config
from daemon.hookspecs import hookimpl
from daemon.results import ClassificationResult

RESULTS_FILE = "results.jsonl"
_FIRST_BLOCK, _MAX_BLOCK = 1 << 12, 1 << 16  # a fresh result's search ends in the first few lines
_TIME = re.compile(rb'"time": "([^"]+)"')


@hookimpl(trylast=True)
def retraind_route_result(result: ClassificationResult, config: Config) -> Path:
    if result.review_reason is not None:
        return config.folder("review")
    return config.folder("outbox") / result.label


@hookimpl
def retraind_on_result(result: ClassificationResult, config: Config) -> None:
    """Write `<image>.json` beside the moved image and append one line to `results.jsonl` (once per id);
    durable at once, or with the rest of the inbox batch when its group commit is deferring."""
    assert result.destination is not None
    line = _encode(result.record())
    write_atomic(result.destination.with_name(result.destination.name + ".json"), line)
    results = config.data_root / RESULTS_FILE
    if not _already_appended(results, result.id, result.time):
        _append_line(results, line)


def _encode(record: dict[str, Any]) -> bytes:
    """UTF-8 JSON. A file name that is not valid UTF-8 keeps its odd bytes as `\\udcXX` escapes, which a JSON
    reader turns back into the same surrogate escapes Python uses for such names."""
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _append_line(results: Path, line: bytes) -> None:
    """Append `line` whole or not at all: a failed write (a full disk) is cut off again, and a line left
    unfinished by a power cut is ended before the new one starts. Created 0666 less the umask, like every file
    the daemon makes: the unit's UMask=0007 makes it group-shared."""
    fd = os.open(results, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        data = (b"\n" if start and os.pread(fd, 1, start - 1) != b"\n" else b"") + line + b"\n"
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            sync_file(results)  # now, or with the batch's other records (daemon.atomic.GroupCommit)
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _already_appended(results: Path, result_id: str, since: str) -> bool:
    """After a crash a sink may run again for one id. Its line, if written, came after the lines of older
    results: read back from the end a block at a time, and stop at a block whose lines are all older. The
    first block is small, the next ones twice as large each: a new result's search, every time, stops at the
    lines just before it (a whole call took 41-66 us with 64 KB read first, 25-27 us with 4 KB)."""
    needle = f'"id": "{result_id}"'.encode()
    try:
        fh = results.open("rb")
    except FileNotFoundError:
        return False
    with fh:
        end, size = fh.seek(0, os.SEEK_END), _FIRST_BLOCK
        while end > 0:
            start = max(0, end - size)
            size = min(size * 2, _MAX_BLOCK)
            fh.seek(start)
            block = fh.read(end - start + len(needle))  # overlap: a needle may straddle two blocks
            if needle in block:
                return True
            first_time = _TIME.search(block)
            if first_time is not None and first_time.group(1).decode() < since:
                return False
            end = start
    return False
