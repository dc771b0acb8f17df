"""Default path filter: ignore our own records and temporary files, take everything else."""

from __future__ import annotations

from pathlib import Path

from daemon.atomic import TMP_PREFIX
from daemon.hookspecs import hookimpl

_RECORD_SUFFIXES = (".error.json",)


@hookimpl(trylast=True)
def retraind_accept_path(path: Path, area: str) -> bool:
    name = path.name
    if name.startswith(TMP_PREFIX) or name.endswith(_RECORD_SUFFIXES):
        return False
    return not (area == "classes" and name.startswith("."))
