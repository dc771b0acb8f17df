"""retrain.py's stable split: a file's split depends only on its name, so adding images never moves old ones."""

from __future__ import annotations

import hashlib
import re

#: retrain.py's MAX_NUM_IMAGES_PER_CLASS: the hash is taken modulo this many buckets.
_BUCKETS = 2**27 - 1
_NOHASH = re.compile(r"_nohash_.*$")

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)


def split_of(file_name: str, validation_percentage: float, testing_percentage: float) -> str:
    """Which split `file_name` belongs to; anything after `_nohash_` is ignored (retrain.py's rule)."""
    stem = _NOHASH.sub("", file_name)
    digest = int(hashlib.sha1(stem.encode("utf-8")).hexdigest(), 16)
    percent = (digest % (_BUCKETS + 1)) * (100.0 / _BUCKETS)
    if percent < validation_percentage:
        return VALIDATION
    if percent < validation_percentage + testing_percentage:
        return TEST
    return TRAIN
