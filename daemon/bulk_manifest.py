"""The completion manifest of a `retraind bulk embed` output folder, and the rule `retraind import` reads it by.

Ray's workers write their Parquet parts into a temporary folder inside `--out` (a `.retraind-tmp-` name, which
`import` never reads); when the job has finished, the driver moves the parts into `--out` and then writes
`MANIFEST` (`_retraind-bulk.json`: the backbone, the vector length and the row count of every part) under a
temporary name and renames it in. A run that crashes, or is still going, leaves no manifest naming its parts, so
`import` refuses a folder without one and ignores parts it does not list: half a backfill is never taken for a
whole one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.atomic import TMP_PREFIX

MANIFEST = "_retraind-bulk.json"  # a leading "_": Parquet readers (pyarrow, Spark, Ray) skip it, as Hadoop's _SUCCESS
FORMAT = "retraind-bulk-embed/1"
_NO_MANIFEST = ("{folder}: no {manifest}, so `retraind bulk embed` did not finish writing here (it crashed, or is "
                "still running); refused")


class IncompleteOutput(Exception):
    """A folder `import` must not read: no manifest (an unfinished or crashed run), or one it cannot parse."""


@dataclass(frozen=True)
class Manifest:
    """What a finished `bulk embed` wrote: `parts` maps each Parquet file's name (in the same folder) to its rows."""

    backbone: str
    dim: int
    parts: dict[str, int]

    def write(self, system: Any, root: str) -> None:
        """Write it into `root` on the pyarrow file system `system`, whole: under a temporary name, then moved."""
        body = {"format": FORMAT, "backbone": self.backbone, "dim": self.dim, "parts": self.parts,
                "rows": sum(self.parts.values()), "finished": datetime.now(UTC).isoformat(timespec="seconds")}
        tmp = f"{root}/{TMP_PREFIX}{uuid.uuid4().hex}-{MANIFEST}"
        with system.open_output_stream(tmp) as stream:
            stream.write(json.dumps(body, indent=1).encode())
        system.move(tmp, f"{root}/{MANIFEST}")

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The manifest of the local `folder`; raises `IncompleteOutput` saying why there is none to use."""
        path = folder / MANIFEST
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IncompleteOutput(_NO_MANIFEST.format(folder=folder, manifest=MANIFEST)) from None
        except (OSError, ValueError) as exc:
            raise IncompleteOutput(f"{path}: unreadable ({exc}); refused") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("parts"), dict):
            raise IncompleteOutput(f"{path}: not a {FORMAT} manifest; refused")
        return cls(str(body.get("backbone")), int(body.get("dim", 0)),
                   {str(name): int(rows) for name, rows in body["parts"].items()})


@dataclass
class ImportPlan:
    """The Parquet parts `import` reads, and one line per thing it leaves out: `ignored` (Parquet files no
    manifest lists: an unfinished run's) and `refused` (a path with no finished output in it)."""

    files: list[Path] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def plan(paths: Iterable[Path]) -> ImportPlan:
    """What `retraind import PATH...` reads: below each folder, the parts its manifests list (a folder may hold
    several finished outputs); a file, only when its folder's manifest lists it."""
    found = ImportPlan()
    for path in paths:
        if path.is_file():
            _add_file(found, path)
        elif path.is_dir():
            _add_folder(found, path)
        else:
            found.refused.append(f"{path}: no such file or folder")
    return found


def _add_file(found: ImportPlan, path: Path) -> None:
    try:
        manifest = Manifest.read(path.parent)
    except IncompleteOutput as exc:
        found.refused.append(f"{path}: {exc}")
        return
    if path.name in manifest.parts:
        found.files.append(path)
    else:
        found.refused.append(f"{path}: not listed in {path.parent / MANIFEST}, so not part of a finished "
                             "`retraind bulk embed` output; refused")


def _add_folder(found: ImportPlan, folder: Path) -> None:
    outputs = sorted(m.parent for m in folder.rglob(MANIFEST) if not _in_tmp(m, folder))
    listed: set[Path] = set()
    for output in outputs:
        try:
            manifest = Manifest.read(output)
        except IncompleteOutput as exc:
            found.refused.append(str(exc))
            continue
        parts = [output / name for name in sorted(manifest.parts)]
        missing = [p for p in parts if not p.is_file()]
        if missing:
            found.refused.append(f"{output}: {MANIFEST} lists {len(missing)} Parquet files that are not there "
                                 f"({missing[0].name}, ...); refused")
            continue
        found.files.extend(parts)
        listed.update(parts)
    if not outputs:
        found.refused.append(_NO_MANIFEST.format(folder=folder, manifest=MANIFEST))
    unlisted: dict[Path, int] = {}
    for part in folder.rglob("*.parquet"):
        if part not in listed:
            unlisted[part.parent] = unlisted.get(part.parent, 0) + 1
    found.ignored += [f"{where}: {n} Parquet files that no {MANIFEST} lists (an unfinished run's); ignored"
                      for where, n in sorted(unlisted.items())]


def _in_tmp(path: Path, top: Path) -> bool:
    return any(part.startswith(TMP_PREFIX) for part in path.relative_to(top).parts)
