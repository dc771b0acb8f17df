"""Default path filter: ignore our own records and temporary files, take everything else. (Names that tools,
trash cans and NAS systems add, hidden files among them, are left out before this hook: `watch.ignore`.)"""

from __future__ import annotations

from pathlib import Path

from daemon.atomic import TMP_PREFIX
from daemon.hookspecs import hookimpl

_RECORD_SUFFIXES = (".error.json",)


@hookimpl(trylast=True)
def retraind_accept_path(path: Path, area: str) -> bool:
    return not (path.name.startswith(TMP_PREFIX) or path.name.endswith(_RECORD_SUFFIXES))
