"""The SQLite store: vectors by content, CRC-checked, the catalog, the journal, persistence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from daemon.config import ConfigError
from daemon.store import CatalogEntry, JournalEntry, Store

BACKBONE = "test/v1"


def test_vectors_round_trip_and_persist(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    vectors = np.random.default_rng(0).random((3, 8), dtype=np.float32)
    store.put_bottlenecks(BACKBONE, [(f"sha{i}", "", v) for i, v in enumerate(vectors)])
    store.close()
    store = Store(tmp_path / "s.sqlite")
    got = store.get_bottlenecks(BACKBONE, ["sha0", "sha2", "nope"])
    assert set(got) == {"sha0", "sha2"}
    np.testing.assert_array_equal(got["sha2"], vectors[2])
    assert store.missing_bottlenecks(BACKBONE, ["sha1", "x"]) == {"x"}
    assert store.missing_bottlenecks("other/v1", ["sha1"]) == {"sha1"}  # backbone is part of the key
    store.close()


def test_corrupt_vector_is_treated_as_missing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.put_bottlenecks(BACKBONE, [("sha0", "", np.ones(4, dtype=np.float32))])
    store.close()
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        db.execute("UPDATE bottlenecks SET vector = ? WHERE sha256 = 'sha0'", (np.zeros(4, np.float32).tobytes(),))
    store = Store(tmp_path / "s.sqlite")
    assert store.missing_bottlenecks(BACKBONE, ["sha0"]) == {"sha0"}
    store.close()


def test_catalog_training_matrix_and_folder_removal(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.put_bottlenecks(BACKBONE, [("a", "", np.full(4, 1, np.float32)), ("b", "", np.full(4, 2, np.float32))])
    store.upsert_file(CatalogEntry("cat/x.jpg", "cat", "a", 10, 1, True))
    store.upsert_file(CatalogEntry("cat/sub/y.jpg", "cat", "b", 10, 1, True))
    store.upsert_file(CatalogEntry("dog/z.jpg", "dog", "b", 10, 1, True))  # same content, two labels
    store.upsert_file(CatalogEntry("dog/bad.jpg", "dog", None, 3, 1, False))
    store.upsert_file(CatalogEntry("catalog/w.jpg", "catalog", "a", 10, 1, True))
    entries, matrix = store.training_matrix(BACKBONE, 4)
    assert [e.path for e in entries] == ["cat/sub/y.jpg", "cat/x.jpg", "catalog/w.jpg", "dog/z.jpg"]
    assert matrix[:, 0].tolist() == [2, 1, 1, 2]
    assert store.remove_files("cat") == 2  # "catalog/" is not below "cat/"
    assert sorted(store.catalog()) == ["catalog/w.jpg", "dog/bad.jpg", "dog/z.jpg"]
    assert store.paths_missing_bottleneck("other/v1") == ["catalog/w.jpg", "dog/z.jpg"]
    store.close()


def test_journal(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.journal_begin(JournalEntry("id1", "/in/a.jpg", "/out/a.jpg", "{}", "moving"))
    assert [e.id for e in store.journal_open()] == ["id1"]
    store.journal_finish("id1")
    assert store.journal_open() == []
    store.close()


def test_training_matrix_skips_files_without_a_valid_vector(tmp_path: Path) -> None:
    """2,500 files, every third with no vector and every fifth with one failing its CRC: the rows that stay
    keep path order and their own vectors (the gaps are closed in place, block by block)."""
    store = Store(tmp_path / "s.sqlite")
    shas = [f"{i:064x}" for i in range(2500)]
    store.put_bottlenecks(BACKBONE, [(sha, "", np.full(3, i, np.float32)) for i, sha in enumerate(shas)
                                     if i % 3])
    db = sqlite3.connect(tmp_path / "s.sqlite")
    with db:
        db.executemany("UPDATE bottlenecks SET crc = crc + 1 WHERE sha256 = ?", [(s,) for s in shas[::5]])
    db.close()
    for i, sha in enumerate(shas):
        store.upsert_file(CatalogEntry(f"l/{i:05d}.jpg", "l", sha, 1, 1, True))
    entries, matrix = store.training_matrix(BACKBONE, 3)
    expected = [i for i in range(2500) if i % 3 and i % 5]
    assert [e.path for e in entries] == [f"l/{i:05d}.jpg" for i in expected]
    assert matrix.shape == (len(expected), 3) and matrix[:, 2].tolist() == expected
    store.close()


def test_a_store_that_is_not_a_database_is_one_config_line(tmp_path: Path) -> None:
    """KIND: the daemon's own state damaged (a disk error, a half-copied backup, another file put in its place).
    `retraind run` on a `store.sqlite` that is not SQLite was a traceback and exit status 1, restarted by
    systemd again and again. It is a `ConfigError` naming `folders.state` and the file, saying what to do
    (exit status 78: not restarted)."""
    from daemon.app import App
    from tests.conftest import make_config
    from tests.tiny_backbone import TinyBackbonePlugin

    store = tmp_path / "data" / "state" / "store.sqlite"
    store.parent.mkdir(parents=True)
    store.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ConfigError) as raised:
        Store(store)
    assert str(raised.value).startswith(f"folders.state: {store} cannot be opened as a SQLite database (")
    assert "move it aside" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="^folders.state: .* cannot be opened as a SQLite database"):
        App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin(),))
    assert store.read_bytes() == bytes(range(256)) * 20  # left as it was, for the user to look at


def test_the_generation_changes_with_every_commit_by_this_store_or_another_connection(tmp_path: Path) -> None:
    """`generation` tells the trainer whether the training set it loaded ahead of a run is still current:
    a write through this store (on any thread, this one included) or through another connection (another
    process's `retraind import`) changes it; reads do not."""
    store, other = Store(tmp_path / "s.sqlite"), Store(tmp_path / "s.sqlite")
    try:
        before = store.generation()
        store.training_matrix(BACKBONE, 4)
        assert store.generation() == before
        store.upsert_files([CatalogEntry("a/1.jpg", "a", "sha1", 1, 1, True)])
        after_own = store.generation()
        assert after_own != before
        other.put_bottlenecks(BACKBONE, [("sha1", "", np.ones(4, dtype=np.float32))])
        assert store.generation() != after_own
    finally:
        store.close()
        other.close()
