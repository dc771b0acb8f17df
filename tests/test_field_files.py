"""Field cases of files and folders (issue 11): copies, replaced files, long names. Each test names the kind of
fault it covers and makes its input here."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from daemon.dataset import build_dataset
from daemon.hookspecs import hookimpl
from daemon.report import render
from tests.conftest import seed_classes, wait_for
from tests.test_daemon_e2e import get, results, scrape
from tests.test_reliability_input import encoded, pixels


def test_identical_bytes_share_one_split_and_the_same_bytes_under_two_labels_are_reported(
    tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """KIND: copies of one picture under several names (`IMG_0001.jpg`, `IMG_0001 (1).jpg`,
    `IMG_0001-copy.jpg`, as file managers and phone imports make them) are one picture: they land in one
    split, never one in train and another in validation (a leak that flatters the validation accuracy), and
    that stays so as copies come and go. The same bytes under two labels contradict each other: reported in
    the log, a metric, the model's metadata (metrics.json and the HTTP API) and the report."""
    data = tmp_path / "data"
    seed_classes(tmp_path, per_label=6)
    red = data / "classes" / "red"
    triples = [[f"IMG_{i:04}.jpg", f"IMG_{i:04} (1).jpg", f"IMG_{i:04}-copy.jpg"] for i in range(20)]
    for i, names in enumerate(triples):
        content = encoded(pixels("red", 100 + i), "JPEG")
        for name in names:
            (red / name).write_bytes(content)
    shared = encoded(pixels("blue", 200), "PNG")
    (red / "shared.png").write_bytes(shared)
    (data / "classes" / "blue" / "shared.png").write_bytes(shared)
    with caplog.at_level(logging.WARNING), run_app() as app:
        version = wait_for(lambda: (v := app.serving.version) is not None and sum(
            sum(per.values()) for per in v.metrics["images"].values()) == 6 + 60 + 1 + 6 + 1 and v,
            what="a model on every file")
        metric = scrape(app).get("retraind_label_conflicts")
        status, metadata = get(app, "/v1/models/retraind/metadata")
        entries, matrix = app.store.training_matrix(app.backbone.id, app.backbone.dim)
    dataset = build_dataset(list(entries), matrix, app.config.split)
    split_of = {path: name for name, part in dataset.parts.items() for path in part.paths}
    splits = [{split_of[f"red/{name}"] for name in names} for names in triples]
    assert [s for s in splits if len(s) > 1] == []
    assert {"train", "validation"} <= set().union(*splits)  # the test means something: both splits are used

    # copies come and go: one copy of each triple deleted, a fourth added; nobody moves
    fewer = [e for e in entries if PurePosixPath(e.path).name not in {names[0] for names in triples}]
    added = [dataclasses.replace(e, path=e.path.replace(" (1)", " (2)")) for e in fewer if " (1)" in e.path]
    again = build_dataset(fewer + added, matrix[: len(fewer) + len(added)].copy(), app.config.split)
    moved = {path: name for name, part in again.parts.items() for path in part.paths
             if path in split_of and split_of[path] != name}
    assert moved == {}
    assert {e.path: split_of[e.path.replace(" (2)", " (1)")] for e in added} == \
        {path: name for name, part in again.parts.items() for path in part.paths if " (2)" in path}

    expected = [{"sha256": dataset.conflicts[0].sha256, "labels": ["blue", "red"],
                 "paths": ["blue/shared.png", "red/shared.png"]}]
    assert [c.record() for c in dataset.conflicts] == expected
    assert version.metrics["label_conflicts"] == expected
    assert (status, metadata["label_conflicts"]) == (200, expected)
    assert metric == 1
    assert any("under labels blue, red: blue/shared.png, red/shared.png" in r.getMessage() for r in caplog.records)
    page = render(version, data / "classes")
    assert "The same image under two labels" in page and "blue/shared.png | red/shared.png" in page


def bmp(colour: str, seed: int) -> bytes:
    """An uncompressed BMP: any two of one size have exactly the same number of bytes."""
    return encoded(pixels(colour, seed), "BMP")


def test_a_file_replaced_while_stopped_with_its_mtime_put_back_is_seen_as_changed(
    tmp_path: Path, run_app: Any
) -> None:
    """KIND: change detection that a restored mtime cannot fool. While the daemon is stopped a training
    image is replaced by another of exactly the same size and its mtime put back (`touch -r`, `cp -p`,
    `rsync -t` and photo tools that keep dates do it): once written in place (same inode), once renamed over
    it (another inode). At the next start both are recomputed and a new model is trained on the new
    pictures; the ctime, which only the kernel sets, and the inode tell."""
    data = tmp_path / "data"
    seed_classes(tmp_path)
    red = data / "classes" / "red"
    in_place, renamed = red / "in-place.bmp", red / "renamed.bmp"
    in_place.write_bytes(bmp("red", 300))
    renamed.write_bytes(bmp("red", 301))
    with run_app() as app:
        first = wait_for(lambda: app.serving.version, what="first model")
        assert sum(first.metrics["images"]["red"].values()) == 14
    replacements = {in_place: bmp("blue", 302), renamed: bmp("blue", 303)}
    for path, content in replacements.items():
        before = os.stat(path)
        assert len(content) == before.st_size
        if path == in_place:
            path.write_bytes(content)
        else:
            (red / "incoming.tmp").write_bytes(content)
            os.utime(red / "incoming.tmp", ns=(before.st_atime_ns, before.st_mtime_ns))
            os.replace(red / "incoming.tmp", path)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with run_app() as app:
        second = wait_for(lambda: (v := app.serving.version) is not None and v.number > first.number and v,
                          what="a model trained on the replaced pictures")
        catalog = app.store.catalog()
        computed = scrape(app)["retraind_bottleneck_cache_misses_total"]
    assert {p.name: catalog[f"red/{p.name}"].sha256 for p in replacements} == \
        {p.name: hashlib.sha256(content).hexdigest() for p, content in replacements.items()}
    assert computed == 2  # the two replaced pictures, nothing else
    assert second.metrics["manifest_sha256"] != first.metrics["manifest_sha256"]


def test_names_up_to_name_max_end_in_one_place_with_their_records(tmp_path: Path, run_app: Any) -> None:
    """KIND: every name the file system accepts (up to NAME_MAX, 255 bytes on Linux) ends in one place with
    its records: the temporary names of atomic writes and the records' names (`<name>.json`,
    `<name>.error.json`) never overflow, whatever the name's length or script."""
    data = tmp_path / "data"
    seed_classes(tmp_path)
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    good = {"a" * 226 + ".jpg": "red", "b" * (limit - 4) + ".jpg": "blue",
            "写" * ((limit - 4) // 3) + ".jpg": "red", "é" * ((limit - 5) // 2) + "x.png": "blue"}
    bad = "c" * (limit - 4) + ".jpg"
    lengths = sorted(len(os.fsencode(name)) for name in [*good, bad])
    assert lengths[0] == 230 and lengths[-1] == limit  # 230 (the field case) up to NAME_MAX itself
    with run_app(classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        for i, (name, colour) in enumerate(good.items()):
            (data / "inbox" / name).write_bytes(encoded(pixels(colour, 400 + i), "PNG" if name.endswith("png") else "JPEG"))
        (data / "inbox" / bad).write_bytes(b"not a picture at all")
        wait_for(lambda: len(results(tmp_path)) == len(good) and not os.listdir(data / "inbox")
                 and not app.store.journal_open(), what="every long name classified or rejected")
    by_file = {record["file"]: record for record in results(tmp_path)}
    assert {name: record["label"] for name, record in by_file.items()} == good
    for record in by_file.values():
        destination = Path(record["destination"])
        assert json.loads(destination.with_name(destination.name + ".json").read_text()) == record
    (error,) = (data / "rejected").glob("*.error.json")
    assert json.loads(error.read_text())["file"] == bad and os.path.exists(str(error)[: -len(".error.json")])


class FailingSink:
    """A result sink whose disk is full until `failing` is cleared."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    @hookimpl
    def retraind_on_result(self, result: Any) -> None:
        self.calls += 1
        if self.failing:
            raise OSError(errno.ENOSPC, "No space left on device", str(result.destination) + ".sink")


def test_a_file_is_never_deleted_without_a_record_and_a_retried_failure_logs_one_short_line(
    tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """KIND: a file is never deleted without a record. While a classified file's records cannot be written
    (its journal entry stays open and is retried), the same picture is dropped again under the same name: the
    new copy is not taken for the first one's leftover and removed; once the sink works again both end in the
    outbox, each with its record. Each retry of the failure logs one short line (the traceback once)."""
    data = tmp_path / "data"
    seed_classes(tmp_path)
    sink = FailingSink()
    content = encoded(pixels("red", 500), "JPEG")
    with caplog.at_level(logging.DEBUG, logger="daemon"), \
            run_app(classify={"confidence_threshold": 0.0}, extra=(sink,)) as app:
        wait_for(lambda: app.serving.version, what="first model")
        (data / "inbox" / "IMG_0001.jpg").write_bytes(content)
        wait_for(lambda: sink.calls >= 1, what="the first copy moved, its sink failing")
        (data / "inbox" / "IMG_0001.jpg").write_bytes(content)
        wait_for(lambda: sink.calls >= 3, timeout=30, what="two retries of the failing sink")
        assert (data / "inbox" / "IMG_0001.jpg").exists(), "the second copy was deleted"
        sink.failing = False
        wait_for(lambda: len(results(tmp_path)) == 2 and not os.listdir(data / "inbox")
                 and not app.store.journal_open(), timeout=60, what="both copies classified")
    outbox = sorted(p.name for p in (data / "outbox" / "red").iterdir() if not p.name.endswith(".json"))
    assert len(outbox) == 2 and all(hashlib.sha256((data / "outbox" / "red" / n).read_bytes()).hexdigest()
                                    == hashlib.sha256(content).hexdigest() for n in outbox)
    assert [r["file"] for r in results(tmp_path)] == ["IMG_0001.jpg", "IMG_0001.jpg"]
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) >= 3
    assert max(len(r.getMessage()) for r in failures) < 400
    assert sum(bool(r.exc_info) for r in failures) <= 1
