"""retrain.py's stable split."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import PurePosixPath

from daemon.config import SplitConfig
from daemon.dataset import content_splits, manifest_of
from daemon.split import TEST, TRAIN, VALIDATION, split_of
from daemon.store import CatalogEntry


def seed_split(file_name: str, validation: float, testing: float) -> str:
    """retrain.py's `which_set`, verbatim in logic (MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1)."""
    hash_name = re.sub(r"_nohash_.*$", "", file_name)
    hashed = hashlib.sha1(hash_name.encode()).hexdigest()
    percentage = (int(hashed, 16) % (2**27)) * (100.0 / (2**27 - 1))
    if percentage < validation:
        return VALIDATION
    if percentage < testing + validation:
        return TEST
    return TRAIN


def test_matches_retrain_py_and_is_stable() -> None:
    names = [f"img_{i}.jpg" for i in range(2000)]
    assert [split_of(n, 10, 10) for n in names] == [seed_split(n, 10, 10) for n in names]
    assert [split_of(n, 10, 10) for n in names] == [split_of(n, 10, 10) for n in names]


def test_nohash_suffix_keeps_variants_together() -> None:
    for i in range(200):
        base = split_of(f"speaker{i}.wav", 20, 20)
        assert split_of(f"speaker{i}.wav_nohash_1", 20, 20) == base
        assert split_of(f"speaker{i}.wav_nohash_anything", 20, 20) == base


def test_percentages_are_respected() -> None:
    counts = Counter(split_of(f"photo-{i}.png", 10, 20) for i in range(20_000))
    assert abs(counts[VALIDATION] / 20_000 - 0.10) < 0.01
    assert abs(counts[TEST] / 20_000 - 0.20) < 0.01
    assert {split_of(f"p{i}", 0, 0) for i in range(100)} == {TRAIN}


def test_the_manifest_and_the_nohash_split_read_the_file_name_of_nested_and_unusual_paths() -> None:
    """The manifest (which says whether a model is current) and `_nohash_` splits use each catalog path's file
    name: as PurePosixPath gives it, for nested folders, spaces, dots and non-ASCII names."""
    paths = ["cat/a.jpg", "cat/sub/deeper/b c.jpg", "dog/.hidden.png", "dög/ü_nohash_2.jpg", "dog/x_nohash_1.jpg"]
    entries = [CatalogEntry(path, path.split("/")[0], f"{i:064x}", 1, 1, True) for i, path in enumerate(paths)]
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(f"{entry.label}\0{entry.sha256}\0{PurePosixPath(entry.path).name}\n".encode())
    assert manifest_of(entries) == digest.hexdigest()
    by_name = [split_of(PurePosixPath(p).name, 30, 30) if "_nohash_" in p else None for p in paths]
    got = content_splits(entries, SplitConfig(validation_percentage=30, testing_percentage=30))
    assert [s if expected else None for s, expected in zip(got, by_name)] == by_name
