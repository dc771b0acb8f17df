"""What the review page shows: the review queue ordered by doubt, suspect training images, and the model.

- **Review queue**: the images in `review/`, each scored again by the serving model from its cached
  bottleneck (the inbox stored it by content hash), ordered most doubtful first by the *margin* between the
  top two calibrated scores (margin sampling: Scheffer et al. 2001; Settles, "Active Learning Literature
  Survey", 2009 §3.1). Near-duplicates — bottlenecks with cosine similarity ≥ `NEAR_DUPLICATE_COSINE` — are
  grouped so one decision labels them all (FiftyOne's embedding-based near-duplicate search works the same
  way). The threshold is measured by `bench/near_duplicates.py` on tuxpaint6 with EfficientNet-Lite0:
  re-encoded, half-size and cropped copies have cosine 0.75–0.99 (median 0.92–0.96), different images at
  most 0.64. The reason each image is there comes from its record (`low_confidence` or `unfamiliar`).
- **Suspects**: training images whose out-of-fold prediction (`out_of_fold.jsonl` of the serving version,
  daemon/trust.py) names another label with calibrated probability ≥ `SUSPECT_PROBABILITY` (confident
  learning's "off-diagonal" examples: Northcutt et al., JAIR 2021), and byte-identical images under two labels.
- **Model**: the serving version's figures and what changed since the previous kept version.

Ids are short hashes of the file name (review) or the path under classes/ (suspects): stable while the
file stays where it is, and no file-system name ever travels in a URL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon.atomic import TMP_PREFIX
from daemon.config import Config
from daemon.ignore import IgnoreRules
from daemon.indexer import label_of
from daemon.registry import ModelRegistry, ModelVersion
from daemon.review_actions import (
    ActionRefused,
    Plan,
    ReviewActions,
    check_label,
    error_record_of,
    now_iso,
    plan_moves,
    sidecar_of,
)
from daemon.serving import ServingModel
from daemon.store import Store
from daemon.trust import OUT_OF_FOLD_FILE

log = logging.getLogger(__name__)

NEAR_DUPLICATE_COSINE = 0.8
SUSPECT_PROBABILITY = 0.8
_RECORD_SUFFIXES = (".json",)


def short_id(text: str) -> str:
    """A 16-hex-digit id for a name or path (surrogate-escaped bytes included)."""
    return hashlib.sha1(os.fsencode(text)).hexdigest()[:16]


@dataclass
class ReviewItem:
    """One image in `review/`. `suggestions` are (label, calibrated score), best first; `margin` is the
    difference of the top two scores (0: a coin toss; 1: certain), or None when the image has no bottleneck
    (put in review/ by hand) and cannot be scored; `group` lists the ids of its near-duplicates."""

    id: str
    path: Path
    sha256: str | None
    reason: str
    suggestions: list[tuple[str, float]]
    margin: float | None
    novelty: float | None
    group: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": os.fsdecode(self.path.name).encode("utf-8", "replace").decode(),
                "sha256": self.sha256, "reason": self.reason, "margin": self.margin, "novelty": self.novelty,
                "suggestions": [{"label": label, "score": score} for label, score in self.suggestions],
                "duplicates": self.group}


class Review:
    """Reads the queue and the suspects; turns a reviewer's decision into a plan for `ReviewActions`."""

    def __init__(self, config: Config, store: Store, serving: ServingModel, registry: ModelRegistry,
                 actions: ReviewActions, backbone_id: str) -> None:
        self._config, self._store, self._serving, self._registry = config, store, serving, registry
        self.actions = actions
        self._backbone_id = backbone_id
        self._ignored = IgnoreRules(config.watch.ignore).name

    # -- the queue ---------------------------------------------------------------------------------------

    def queue(self) -> list[list[ReviewItem]]:
        """Groups of near-duplicate review images, the most doubtful group first (unscored ones last)."""
        items = [self._item(path) for path in self._review_files()]
        groups = self._grouped(items)
        groups.sort(key=lambda g: (g[0].margin is None, g[0].margin if g[0].margin is not None else 0.0,
                                   g[0].path.name))
        return groups

    def item(self, item_id: str) -> ReviewItem:
        for path in self._review_files():
            if short_id(path.name) == item_id:
                return self._item(path)
        raise KeyError(item_id)

    def _review_files(self) -> list[Path]:
        folder = self._config.folder("review")
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        return sorted(Path(e.path) for e in entries
                      if e.is_file(follow_symlinks=False) and not e.name.startswith((TMP_PREFIX, "."))
                      and not e.name.endswith(_RECORD_SUFFIXES))

    def _item(self, path: Path) -> ReviewItem:
        record = _read_json(sidecar_of(path)) or {}
        sha = record.get("sha256") if isinstance(record.get("sha256"), str) else None
        version = self._serving.version
        vector = self._vector(sha)
        suggestions: list[tuple[str, float]] = []
        if version is not None and vector is not None:
            suggestions = list(self._serving.top_k(version, vector[None, :], len(version.labels))[0])
        elif isinstance(record.get("top_k"), list):
            suggestions = [(str(t["label"]), float(t["score"])) for t in record["top_k"]]
        margin = None
        if suggestions:
            margin = round(suggestions[0][1] - (suggestions[1][1] if len(suggestions) > 1 else 0.0), 6)
        novelty = record.get("novelty")
        return ReviewItem(short_id(path.name), path, sha, str(record.get("review_reason") or "low_confidence"),
                          suggestions[: self._config.classify.top_k], margin,
                          float(novelty) if isinstance(novelty, (int, float)) else None)

    def _vector(self, sha: str | None) -> np.ndarray | None:
        if sha is None:
            return None
        version = self._serving.version  # its bottlenecks: another id than the configured one during a migration
        return self._store.get_bottlenecks(version.backbone if version else self._backbone_id, [sha]).get(sha)

    def _grouped(self, items: list[ReviewItem]) -> list[list[ReviewItem]]:
        """Union of items whose bottlenecks are near-duplicates (or whose content is identical)."""
        parent = list(range(len(items)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        scored = [(i, v) for i, v in ((i, self._vector(item.sha256)) for i, item in enumerate(items)) if v is not None]
        if len(scored) > 1:
            matrix = np.stack([v for _, v in scored]).astype(np.float32)
            matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
            similar = np.argwhere(np.triu(matrix @ matrix.T, k=1) >= NEAR_DUPLICATE_COSINE)
            for a, b in similar:
                parent[root(scored[a][0])] = root(scored[b][0])
        by_root: dict[int, list[ReviewItem]] = defaultdict(list)
        for i, item in enumerate(items):
            by_root[root(i)].append(item)
        groups = []
        for members in by_root.values():
            members.sort(key=lambda m: (m.margin is None, m.margin or 0.0))
            for member in members:
                member.group = [m.id for m in members if m is not member]
            groups.append(members)
        return groups

    # -- decisions on review images ----------------------------------------------------------------------

    def label(self, item_ids: list[str], label: object) -> int:
        """Move review images into `classes/<label>/` (a new label makes its folder); returns the action's
        sequence number. Raises ActionRefused (bad label) or KeyError (no such image)."""
        name = self._label(label)
        paths = [self.item(i).path for i in item_ids]
        plan = Plan(moves=plan_moves([(p, self._label_folder(name)) for p in paths], "reviewed"),
                    subject={"label": name})
        plan.removed = _existing_texts(sidecar_of(p) for p in paths)
        return self.actions.carry_out("label", plan)

    def _label(self, label: object) -> str:
        """`check_label`, and not a name `watch.ignore` leaves alone (images moved there are never trained on).
        Raises ActionRefused."""
        name = check_label(label)
        if self._ignored(name):
            raise ActionRefused(f"label {name!r}: watch.ignore leaves folders of that name alone, so its images "
                                "would never be trained on; choose another name")
        return name

    def _label_folder(self, label: str) -> Path:
        """Where images taught `label` go: its folder under `classes/`, or the one that spells it in another
        Unicode normal form (`label_of`), so a decision never makes a second folder of one label."""
        classes = self._config.folder("classes")
        try:
            names = {e.name for e in os.scandir(classes) if e.is_dir(follow_symlinks=False) and label_of(e.name) == label}
        except OSError:
            names = set()
        return classes / (label if label in names or not names else min(names))

    def reject(self, item_ids: list[str]) -> int:
        """Move review images to `rejected/` beside an error record saying a reviewer rejected them."""
        paths = [self.item(i).path for i in item_ids]
        plan = self._to_rejected(paths, {"reason": "rejected_by_reviewer",
                                         "error": "a reviewer rejected it from the review queue"})
        plan.removed = _existing_texts(sidecar_of(p) for p in paths)
        return self.actions.carry_out("reject", plan)

    def _to_rejected(self, sources: list[Path], record: dict[str, Any],
                     subject: dict[str, Any] | None = None) -> Plan:
        """Moves of `sources` into `rejected/`, each beside `<name>.error.json` holding `record` (plus the
        file's name there and the time), as the daemon records every file it rejects."""
        plan = Plan(moves=plan_moves([(s, self._config.folder("rejected")) for s in sources], "reviewed"),
                    subject=subject or {})
        for _, destination in plan.moves:
            plan.written[error_record_of(destination)] = json.dumps(
                {"file": os.fsdecode(destination.name), **record, "time": now_iso()})
        return plan

    # -- suspects ----------------------------------------------------------------------------------------

    def suspects(self) -> list[dict[str, Any]]:
        """Training images a reviewer should look at, most confident disagreement first: `kind` is
        `disagrees` (out-of-fold prediction `suggested` with `probability`) or `duplicate` (the same bytes
        also under `other_labels`)."""
        catalog = {e.path: e for e in self._store.catalog().values() if e.ok}
        kept = self.actions.kept()
        found: list[dict[str, Any]] = []
        version = self._serving.version
        for row in _out_of_fold_rows(version):
            entry = catalog.get(row.get("path", ""))
            if (entry is None or entry.sha256 != row.get("sha256") or row.get("predicted") == row.get("label")
                    or float(row.get("probability", 0.0)) < SUSPECT_PROBABILITY or (entry.path, entry.sha256) in kept):
                continue
            found.append({"id": short_id(entry.path), "kind": "disagrees", "path": entry.path, "label": entry.label,
                          "sha256": entry.sha256, "suggested": row["predicted"],
                          "probability": round(float(row["probability"]), 4)})
        found.sort(key=lambda s: -s["probability"])
        by_sha: dict[str, list[str]] = defaultdict(list)
        for entry in catalog.values():
            by_sha[str(entry.sha256)].append(entry.path)
        listed = {suspect["path"]: suspect for suspect in found}
        for sha, paths in sorted(by_sha.items()):
            labels = {catalog[p].label for p in paths}
            if len(labels) < 2:
                continue
            for path in sorted(paths):
                others = sorted(labels - {catalog[path].label})
                if path in listed:  # one card per image: a disagreeing one also says where its copies are
                    listed[path]["other_labels"] = others
                elif (path, sha) not in kept:
                    found.append({"id": short_id(path), "kind": "duplicate", "path": path,
                                  "label": catalog[path].label, "sha256": sha, "suggested": None,
                                  "other_labels": others})
        return found

    def suspect(self, suspect_id: str) -> dict[str, Any]:
        """A suspect whose file is still where the catalog says (the catalog follows moves a moment later)."""
        for suspect in self.suspects():
            if suspect["id"] == suspect_id and os.path.lexists(self._config.folder("classes") / suspect["path"]):
                return suspect
        raise KeyError(suspect_id)

    def fix_suspect(self, suspect_id: str, action: str, label: object = None) -> int:
        """`move` (to `label`, default the suggested one), `keep` (stop listing it), or `remove` (out of
        training, into `rejected/` with a record). Raises ActionRefused or KeyError."""
        suspect = self.suspect(suspect_id)
        source = self._config.folder("classes") / suspect["path"]
        if action == "keep":
            return self.actions.carry_out("keep", Plan(subject={"path": suspect["path"], "sha256": suspect["sha256"]}))
        if action == "move":
            target = self._label(label if label is not None else suspect["suggested"])
            if target == suspect["label"]:
                raise ActionRefused(f"{suspect['path']} is already under {target!r}")
            return self.actions.carry_out("move", Plan(
                moves=plan_moves([(source, self._label_folder(target))], "reviewed"),
                subject={"path": suspect["path"], "label": target}))
        if action == "remove":
            plan = self._to_rejected([source], {"reason": "removed_from_training", "label": suspect["label"],
                                                "error": "a reviewer removed it from the training set"},
                                     {"path": suspect["path"]})
            return self.actions.carry_out("remove", plan)
        raise ActionRefused(f"action {action!r}: use move, keep or remove")

    # -- the model ---------------------------------------------------------------------------------------

    def model(self) -> dict[str, Any]:
        """The serving version's figures (accuracy per split and class, confusion matrix, trust: target
        precision, expected coverage, calibration error, novelty threshold), the pictures it has, and what
        changed since the previous kept version (accuracy per split, labels added or gone, image counts)."""
        version = self._serving.version
        if version is None:
            return {"version": None}
        metrics = version.metrics
        previous = self._previous(version)
        summary: dict[str, Any] = {
            "version": version.number, "backbone": version.backbone, "labels": list(version.labels),
            "created": metrics.get("created"), "accuracy": metrics.get("accuracy", {}),
            "per_class_accuracy": metrics.get("per_class_accuracy", {}),
            "confusion_matrix": metrics.get("confusion_matrix"), "confusion_split": metrics.get("confusion_split"),
            "trust": metrics.get("trust"),
            "images": metrics.get("images"),
            "plots": sorted(p.name for p in version.directory.glob("*.png")),
        }
        if previous is not None:
            summary["previous"] = {
                "version": previous.number,
                "accuracy": {split: _delta(metrics.get("accuracy", {}).get(split),
                                           previous.metrics.get("accuracy", {}).get(split))
                             for split in metrics.get("accuracy", {})},
                "per_class_accuracy": {label: _delta(value, previous.metrics.get("per_class_accuracy", {}).get(label))
                                       for label, value in metrics.get("per_class_accuracy", {}).items()},
                "labels_added": sorted(set(version.labels) - set(previous.labels)),
                "labels_removed": sorted(set(previous.labels) - set(version.labels)),
                "images": previous.metrics.get("images"),
            }
        return summary

    def _previous(self, version: ModelVersion) -> ModelVersion | None:
        older = [n for n in self._registry.versions() if n < version.number]
        if not older:
            return None
        try:
            return self._registry.load(older[-1])
        except (OSError, ValueError, KeyError):
            return None

    def plot(self, name: str) -> Path:
        """A picture of the serving version by file name (only names the version folder holds)."""
        version = self._serving.version
        if version is None or name not in {p.name for p in version.directory.glob("*.png")}:
            raise KeyError(name)
        return version.directory / name

    # -- files by content, for thumbnails ----------------------------------------------------------------

    def file_with(self, sha256: str) -> Path | None:
        """A review or training file whose record or catalog entry says it holds `sha256`."""
        for path in self._review_files():
            record = _read_json(sidecar_of(path)) or {}
            if record.get("sha256") == sha256:
                return path
        for entry in self._store.catalog().values():
            if entry.sha256 == sha256:
                return self._config.folder("classes") / entry.path
        return None


def _delta(now: Any, before: Any) -> dict[str, Any]:
    change = round(now - before, 6) if isinstance(now, (int, float)) and isinstance(before, (int, float)) else None
    return {"now": now, "before": before, "change": change}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _existing_texts(paths: Any) -> dict[Path, str]:
    texts = {}
    for path in paths:
        try:
            texts[path] = path.read_text(encoding="utf-8", errors="surrogateescape")
        except FileNotFoundError:
            continue
    return texts


def _out_of_fold_rows(version: ModelVersion | None) -> list[dict[str, Any]]:
    if version is None:
        return []
    try:
        # split at newlines only: splitlines() also breaks at U+2028/U+2029 and NEL, which JSON keeps raw
        lines = (version.directory / OUT_OF_FOLD_FILE).read_text(encoding="utf-8").split("\n")
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


