"""The stable split: a file's split depends only on its own content (or, with retrain.py's `_nohash_` rule, on
its name), so identical bytes under several names share one split and adding images never moves old ones."""

from __future__ import annotations

import hashlib
import re

#: retrain.py's MAX_NUM_IMAGES_PER_CLASS: the hash is taken modulo this many buckets.
_BUCKETS = 2**27 - 1
_NOHASH = re.compile(r"_nohash_.*$")

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)
#: Recorded in each model's metrics; the gate never compares models whose splits were drawn by other rules
#: (each would be scored on images the other trained on). retrain.py's rule hashed every name.
SPLIT_RULE = "content-v1"


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


def split_key(file_name: str, sha256: str) -> str:
    """What decides a file's split: its content hash, so copies (`IMG_1.jpg`, `IMG_1 (1).jpg`) never land in
    both train and validation, and no file moves as others come and go; for a name with `_nohash_`, the name
    before it (retrain.py's way to keep related pictures, e.g. one speaker's recordings, in one split)."""
    stem = _NOHASH.sub("", file_name)
    return stem if stem != file_name else sha256
