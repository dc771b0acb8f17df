"""`retraind bulk embed|classify` on a real local Ray (one session for this module, 2 CPUs) and `retraind import`:
the vectors are the daemon's own, an import makes the same images cost no forward pass, a bad file is an error
row (or record), never a crash; a Parquet file of another backbone is refused in one line.

Images: a few of ../shared/data/tuxpaint6 when it is there, else generated ones."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from daemon.backbone import Backbone
from daemon.bulk import COLUMNS, schema
from daemon.bulk_manifest import MANIFEST, Manifest
from daemon.cli import main
from daemon.config import BackboneConfig
from daemon.hookspecs import hookimpl
from daemon.trust import judge
from tests.conftest import SHARED_DATA, image_bytes, seed_classes, wait_for, write_image
from tests.test_cli import write_config
from tests.tiny_backbone import TinyBackbonePlugin

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pafs = pytest.importorskip("pyarrow.fs")
TINY_ID, TINY_DIM = "tiny/seed7/v1", 16


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One local Ray for the module (starting one costs seconds); the commands use it instead of their own."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


def archive(root: Path, per_label: int = 4) -> dict[str, bytes]:
    """`<label>/<name>` → bytes written under `root`: tuxpaint6 images of two classes, or generated ones."""
    files: dict[str, bytes] = {}
    if SHARED_DATA.is_dir():
        for label in ("animals", "vehicles"):
            for path in sorted((SHARED_DATA / label).iterdir())[:per_label]:
                files[f"{label}/{path.name}"] = path.read_bytes()
    else:
        for label in ("red", "blue"):
            for i in range(per_label):
                files[f"{label}/{label}-{i}.png"] = image_bytes(label, 500 + i, "PNG")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def broken(root: Path, label: str) -> tuple[str, str]:
    """A JPEG cut short (damaged content) and an empty file under `root/label/`; their relative paths."""
    (root / label).mkdir(parents=True, exist_ok=True)
    (root / label / "cut.jpg").write_bytes(image_bytes("red", 1)[:300])
    (root / label / "empty.jpg").write_bytes(b"")
    return f"{label}/cut.jpg", f"{label}/empty.jpg"


def run(config: Path, *args: str, tiny: TinyBackbonePlugin) -> int:
    return main(["--config", str(config), *args], plugins=[tiny])


def test_embed_gives_the_daemons_vectors_and_an_import_saves_every_forward_pass(
        tmp_path: Path, ray_local: None, run_app: Any, tiny: TinyBackbonePlugin,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, out = tmp_path / "archive", tmp_path / "parquet"
    files = archive(source)
    cut, empty = broken(source, next(iter(files)).split("/")[0])
    config = write_config(tmp_path)

    assert run(config, "bulk", "embed", str(source), "--out", out.as_uri(), "--workers", "1", tiny=tiny) == 0
    assert f"embedded {len(files) + 2} files" in capsys.readouterr().out  # to a URI: on its own file system
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["backbone"], manifest["dim"], manifest["rows"]) == (TINY_ID, TINY_DIM, len(files) + 2)
    assert sorted(manifest["parts"]) == sorted(p.name for p in out.iterdir() if p.suffix == ".parquet"), \
        "every part moved in, nothing left aside"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    table = pq.read_table(out)
    assert table.schema == schema(TINY_DIM) and tuple(table.column_names) == COLUMNS
    rows = {Path(row["path"]).relative_to(source).as_posix(): row for row in table.to_pylist()}
    assert sorted(rows) == sorted([*files, cut, empty])
    assert rows[cut]["error"].startswith(("corrupt: ", "unsupported: ")) and rows[cut]["vector"] is None
    assert rows[empty]["error"].startswith("empty: ") and rows[empty]["sha256"] is None
    for rel, data in files.items():
        row = rows[rel]
        assert (row["sha256"], row["backbone"], row["label"], row["error"]) == (
            hashlib.sha256(data).hexdigest(), TINY_ID, rel.split("/")[0], None), rel

    assert run(config, "bulk", "embed", str(source), "--out", str(out), tiny=tiny) == 65  # before any Ray work
    assert f"{out}: holds a finished `bulk embed` output already" in capsys.readouterr().err

    assert run(config, "import", str(out), tiny=tiny) == 0
    assert f"imported {len(files)}, skipped 2 " in capsys.readouterr().out
    assert run(config, "import", str(out), tiny=tiny) == 0  # idempotent
    assert f"imported 0, skipped {len(files) + 2} " in capsys.readouterr().out

    shutil.copytree(source, tmp_path / "data" / "classes", dirs_exist_ok=True)
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="a model trained on the imported bottlenecks")
        sample = app.metrics.registry.get_sample_value
        assert sample("retraind_bottleneck_compute_seconds_count") == 0, "the extractor ran a forward pass"
        assert sample("retraind_bottleneck_cache_misses_total") == 0
        assert sample("retraind_bottleneck_cache_hits_total") >= len(files)
        assert tiny.images_embedded == 0, "an imported image went through the backbone again"
        daemon = app.extractor.embed(np.stack([app.extractor.decode(data) for data in files.values()]))
    bulk = np.array([rows[rel]["vector"] for rel in files], dtype=np.float32)
    np.testing.assert_allclose(bulk, daemon, atol=1e-5)


def test_import_refuses_another_backbone_in_one_line(tmp_path: Path, tiny: TinyBackbonePlugin,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    sha = hashlib.sha256(b"x").hexdigest()
    folder = tmp_path / "parquet"
    folder.mkdir()
    for name, backbone, dim in (("short", TINY_ID, 8), ("other", "efficientnet_lite0/abc/v1", TINY_DIM)):
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(dim, np.float32)), dim)
        table = pa.Table.from_arrays([pa.array([sha]), pa.array([backbone]), vectors, pa.array(["a.jpg"]),
                                      pa.array([None], pa.string()), pa.array([None], pa.string())],
                                     schema=schema(dim))
        pq.write_table(table, folder / f"{name}.parquet")
    Manifest(TINY_ID, TINY_DIM, {"short.parquet": 1, "other.parquet": 1}).write(pafs.LocalFileSystem(), str(folder))

    assert run(config, "import", str(folder), tiny=tiny) == 65
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2, lines
    assert "other.parquet: rows of backbone efficientnet_lite0/abc/v1, but the configured backbone is " \
           f"{TINY_ID}; refused 1 rows" in lines[0]
    assert f"short.parquet: vectors of 8 floats, but the configured backbone {TINY_ID} makes 16" in lines[1]
    assert "imported 0, skipped 0 (stored already or error rows), refused 2" in captured.out


class CrashingTiny(TinyBackbonePlugin):
    """The tiny backbone, failing the batch that holds an all-white image once a part of the job's output is on
    disk: a backfill that dies half-way (a worker killed, a node lost) after writing some of its Parquet."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def __getstate__(self) -> dict[str, object]:
        return {**super().__getstate__(), "out": self.out}

    @hookimpl
    def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
        made = super().retraind_make_backbone(config, cache_dir)
        if made is None:
            return None
        out = self.out

        class Crashing:
            id, input_size, dim = made.id, made.input_size, made.dim

            def embed(self, images: np.ndarray) -> np.ndarray:
                if (images == 255).all(axis=(1, 2, 3)).any():
                    wait_for(lambda: any(out.rglob("*.parquet")), timeout=60, what="a part written before the crash")
                    raise RuntimeError("the worker died half-way")
                return made.embed(images)  # type: ignore[union-attr]

        return Crashing()  # type: ignore[return-value]


def test_a_crashed_embed_leaves_no_output_that_import_takes(
        tmp_path: Path, ray_local: None, tiny: TinyBackbonePlugin, capsys: pytest.CaptureFixture[str]) -> None:
    source, out = tmp_path / "archive", tmp_path / "parquet"
    archive(source)
    (source / "zzz").mkdir()
    Image.new("RGB", (40, 40), "white").save(source / "zzz" / "white.png")  # the last batch: the crash
    config = write_config(tmp_path, backbone={"batch_size": 2})

    with pytest.raises(Exception, match="the worker died half-way"):
        main(["--config", str(config), "bulk", "embed", str(source), "--out", str(out), "--workers", "1"],
             plugins=[CrashingTiny(out)])
    assert any(out.rglob("*.parquet")), "the crash came after some parts were written"
    assert not (out / MANIFEST).exists() and not list(out.glob("*.parquet")), "parts stay aside until the end"

    assert run(config, "import", str(out), tiny=tiny) == 65
    captured = capsys.readouterr()
    assert f"retraind: {out}: no {MANIFEST}, so `retraind bulk embed` did not finish writing here (it crashed, " \
           "or is still running); refused" in captured.err.splitlines()
    assert re.search(rf"retraind: {re.escape(str(out))}/\.retraind-tmp-\w+: \d+ Parquet files that no {MANIFEST} "
                     r"lists \(an unfinished run's\); ignored", captured.err), captured.err
    assert "0 Parquet files: imported 0, skipped 0" in captured.out
    assert tiny.images_embedded == 0


def test_classify_writes_the_daemons_records_and_leaves_files_in_place(
        tmp_path: Path, ray_local: None, run_app: Any, tiny: TinyBackbonePlugin,
        capsys: pytest.CaptureFixture[str]) -> None:
    """KIND: a bulk record is the daemon's record for the same file, the filing decision included. `bulk
    classify` used to write only the calibrated top-k: `review_reason` and `novelty` were null, so an archive
    run said "filed" where the daemon sends the file to review. INPUT: a config that reviews every image
    (`classify.confidence_threshold: 1`); each record must carry the daemon's `low_confidence` and its novelty
    score."""
    review_all = {"confidence_threshold": 1.0}
    seed_classes(tmp_path)
    source, out = tmp_path / "archive", tmp_path / "results"
    files = {f"{colour}-{i}.jpg": image_bytes(colour, 900 + i) for colour in ("red", "blue") for i in range(2)}
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    cut, _ = broken(source, "odd")
    with run_app(classify=review_all) as app:
        version = wait_for(lambda: app.serving.version, what="first model")
        vectors = app.extractor.embed(np.stack([app.extractor.decode(data) for data in files.values()]))
        tops = app.serving.top_k(version, vectors, 5)
        judged = judge(version, vectors, app.config.classify)
        write_image(tmp_path / "data" / "inbox" / "one.jpg", "red", seed=77)
        results = tmp_path / "data" / "results.jsonl"
        daemon_record = json.loads(wait_for(lambda: results.exists() and results.read_text(), what="a record"))
    assert daemon_record["review_reason"] == "low_confidence"
    config = write_config(tmp_path, classify=review_all)

    assert run(config, "bulk", "classify", str(source), "--out", str(out), tiny=tiny) == 0
    assert "classified 6 files" in capsys.readouterr().out
    records = {Path(r["path"]).relative_to(source).as_posix(): r
               for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert len(records) == 6 and sorted(p.relative_to(source).as_posix() for p in source.rglob("*.jpg")) == \
        sorted(records), "every file is still where it was, with one record"
    for (name, data), top, judgement in zip(files.items(), tops, judged):
        record = records[name]
        assert record["review_reason"] == judgement.review_reason == "low_confidence"
        assert judgement.novelty is not None and record["novelty"] == pytest.approx(judgement.novelty, rel=1e-4)
        assert set(record) == set(daemon_record) | {"path"}
        assert (record["label"], record["model_version"], record["sha256"], record["destination"]) == (
            top[0][0], version.number, hashlib.sha256(data).hexdigest(), None)
        assert {t["label"]: t["score"] for t in record["top_k"]} == pytest.approx(dict(top), abs=1e-5)
    assert records[cut]["reason"] in ("corrupt", "unsupported") and "label" not in records[cut]
    assert records["odd/empty.jpg"]["reason"] == "empty"


def test_sources_by_uri_are_listed_labelled_and_read_like_folders(tmp_path: Path) -> None:
    from daemon.bulk_sources import SourceError, SourceReader, list_sources
    from daemon.images import ImageRejected

    files = archive(tmp_path / "archive", per_label=2)
    (tmp_path / "archive" / "loose.png").write_bytes(image_bytes("red", 3, "PNG"))
    (tmp_path / "archive" / "red.jpg.error.json").write_text("{}")  # a daemon record: the path filter skips it
    listed = list_sources([(tmp_path / "archive").as_uri()], lambda rel: not rel.name.endswith(".error.json"))
    by_name = {Path(f.shown).name: f for f in listed}
    assert all(f.shown.startswith("file://") for f in listed) and "red.jpg.error.json" not in by_name
    assert by_name["loose.png"].label is None
    reader = SourceReader(max_bytes=10**6)
    for rel, data in files.items():
        found = by_name[Path(rel).name]
        assert found.label == rel.split("/")[0]
        assert reader.read(found.root, found.path, found.shown, found.size) == (data, hashlib.sha256(data).hexdigest())
    small = SourceReader(max_bytes=10)
    with pytest.raises(ImageRejected, match="above watch.max_file_bytes=10"):
        small.read(listed[0].root, listed[0].path, listed[0].shown, listed[0].size)
    with pytest.raises(SourceError, match="no such file or folder"):
        list_sources([str(tmp_path / "missing")], lambda rel: True)


def test_the_last_line_says_what_starting_and_stopping_ray_cost() -> None:
    from daemon.bulk import BulkRun, RayTimes
    from daemon.bulk_cli import _summary

    own = BulkRun(10, {"corrupt": 2, "empty": 1}, 12.0, 2, RayTimes(start=3.0, stop=1.5))
    assert _summary("embedded", own, "/out") == (
        "embedded 10 files in 12.0 s (0.8 files/s, 2 workers, Ray's start 3.0 s and stop 1.5 s included); "
        "errors: 2 corrupt, 1 empty; wrote /out")
    joined = BulkRun(10, {}, 2.0, 1, RayTimes())  # a Ray started already: nothing of it to count
    assert _summary("embedded", joined, "/out") == "embedded 10 files in 2.0 s (5.0 files/s, 1 workers); " \
        "errors: none; wrote /out"


def test_a_source_is_read_to_the_size_limit_never_to_its_end(tmp_path: Path) -> None:
    """KIND: a listed file was read whole (`readall`) and only then compared with `watch.max_file_bytes`, so a
    file that grew after the listing (a log, a download, a disk image dropped under the name) filled memory.
    INPUT: a file listed at 3 bytes that is now a sparse GiB, read with a limit of 10 bytes in a fresh process:
    it is refused as too large and the process never holds the GiB (its own peak RSS, VmHWM: `ru_maxrss` would count the forked test process)."""
    grown = tmp_path / "grown.jpg"
    with grown.open("wb") as sparse:
        sparse.truncate(1 << 30)
    probe = (
        "import re, sys\n"
        "from daemon.bulk_sources import SourceReader\n"
        "from daemon.images import ImageRejected\n"
        "try:\n"
        "    SourceReader(max_bytes=10).read(sys.argv[1], sys.argv[2], 'grown.jpg', 3)\n"
        "except ImageRejected as exc:\n"
        "    print(exc)\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path), str(grown)], capture_output=True,
                          text=True, timeout=120, check=True)
    said, peak_mib = done.stdout.splitlines()
    assert "above watch.max_file_bytes=10" in said
    assert int(peak_mib) < 512, f"peak RSS {peak_mib} MiB: the file was read whole"
