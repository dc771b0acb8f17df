"""House style, checked: ruff-clean everywhere, mypy --strict-clean on the daemon and its plugins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)


def test_ruff_clean() -> None:
    done = _run("ruff", "check", "daemon", "plugins", "tests", "bench", "examples")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_clean() -> None:
    done = _run("mypy", "daemon", "plugins")
    assert done.returncode == 0, done.stdout + done.stderr
