"""Model versions on disk: `models/<n>/` folders published whole, and a `CURRENT` pointer swapped atomically."""

from __future__ import annotations

import json
import logging
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.atomic import TMP_PREFIX, fsync_tree, write_atomic
from daemon.config import Config
from daemon.head import Head

if TYPE_CHECKING:
    from daemon.trust import Trust

log = logging.getLogger(__name__)

HEAD_FILE, LABELS_FILE, METRICS_FILE, CURRENT_FILE = "head.npz", "labels.txt", "metrics.json", "CURRENT"
#: Pictures a plugin may add to a version folder (the built-in `plots` draws them; `retraind report` shows them)
TRAINING_CURVE_FILE, CONFUSION_MATRIX_FILE = "training_curve.png", "confusion_matrix.png"


@dataclass(frozen=True)
class ModelVersion:
    """A published (or being published) model: the head, its labels in output order, and its metrics;
    `trust` (calibrator, novelty score, thresholds) is attached by whoever serves it (daemon/trust.py)."""

    number: int
    directory: Path
    labels: tuple[str, ...]
    backbone: str
    head: Head
    metrics: dict[str, Any]
    trust: Trust | None = None


class ModelUnreadable(ValueError):
    """A published version whose files cannot be read back (missing, damaged, or labels out of step with the
    head); the message names its folder."""


class ModelRegistry:
    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def of(cls, config: Config) -> ModelRegistry:
        """The registry a config's daemon publishes to: `<state>/models`, keeping `training.keep_versions`."""
        return cls(config.folder("state") / "models", config.training.keep_versions)

    def versions(self) -> list[int]:
        return version_numbers(self.root)

    def load(self, number: int) -> ModelVersion:
        """Version `number` read back; `ModelUnreadable` when its files are missing, damaged or out of step."""
        directory = self.root / str(number)
        try:
            labels = tuple((directory / LABELS_FILE).read_text(encoding="utf-8").splitlines())
            metrics = json.loads((directory / METRICS_FILE).read_text(encoding="utf-8"))
            head = Head.load(directory / HEAD_FILE)
            backbone = str(metrics["backbone"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ModelUnreadable(f"{directory} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        if head.weights.shape[1] != len(labels):
            raise ModelUnreadable(f"{directory} cannot be loaded: the head has {head.weights.shape[1]} outputs "
                                  f"for {len(labels)} lines of {LABELS_FILE}")
        return ModelVersion(number, directory, labels, backbone, head, metrics)

    def current(self) -> ModelVersion | None:
        """The version `CURRENT` points to, or None when there is none yet."""
        pointer = self.root / CURRENT_FILE
        if not pointer.exists():
            return None
        return self.load(int(pointer.read_text().strip()))

    def publish(
        self, head: Head, labels: tuple[str, ...], metrics: dict[str, Any],
        add_artifacts: Callable[[ModelVersion, Path], None],
    ) -> ModelVersion:
        """Build the next version in a temporary folder, rename it into place, then swap `CURRENT`."""
        number = max(self.versions(), default=0) + 1
        final = self.root / str(number)
        tmp = self.root / f"{TMP_PREFIX}{number}-{time.time_ns()}"
        tmp.mkdir()
        try:
            metrics = {**metrics, "version": number}
            head.save(tmp / HEAD_FILE)
            (tmp / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            add_artifacts(ModelVersion(number, tmp, labels, str(metrics["backbone"]), head, metrics), tmp)
            fsync_tree(tmp)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_atomic(self.root / CURRENT_FILE, f"{number}\n".encode())
        prune_versions(self.root, self.keep, number)
        return ModelVersion(number, final, labels, str(metrics["backbone"]), head, metrics)


def version_numbers(root: Path) -> list[int]:
    """The numbered version folders in `root` (a registry, a TF Serving or Triton model folder), ascending."""
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def prune_versions(root: Path, keep: int, current: int) -> None:
    """Remove all but the newest `keep` version folders of `root` (never `current`), and leftover
    temporary folders of interrupted publications."""
    for number in version_numbers(root)[:-keep]:
        if number != current:
            shutil.rmtree(root / str(number), ignore_errors=True)
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)

