"""The shipped systemd unit: required directives, and a clean ``systemd-analyze verify``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "retraind.service"

Sections = dict[str, dict[str, list[str]]]

REQUIRED: dict[str, dict[str, str]] = {
    "Service": {
        "Type": "notify",
        "ExecStart": "/opt/retraind/.venv/bin/retraind run --config /etc/retraind/config.yaml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "NotifyAccess": "main",
        "WatchdogSec": "60",
        "TimeoutStartSec": "300",
        "DynamicUser": "yes",
        "StateDirectory": "retraind",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "SupplementaryGroups": "retraind",
        "ReadWritePaths": "/srv/retraind",
        "Restart": "on-failure",
        "RestartSec": "5",
        "RestartPreventExitStatus": "78",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "60",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0007",
        "PrivateUsers": "yes",
        "PrivateMounts": "yes",
        "IPAddressDeny": "any",
        "IPAddressAllow": "localhost",
    },
    "Install": {"WantedBy": "multi-user.target"},
}

# What systemd prints for unit-file mistakes it otherwise ignores (rc stays 0 for most of them).
BAD_OUTPUT = re.compile(
    r"Unknown key|Unknown section|Unknown lvalue|Failed to parse|Invalid|ignoring|not executable"
    r"|deprecated|Missing",
    re.IGNORECASE,
)


def parse_unit(text: str) -> Sections:
    """Tiny unit-file parser (like configparser with strict=False), keeping repeated keys."""
    sections: Sections = {}
    current: dict[str, list[str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):  # systemd line continuation
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=Value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> Sections:
    return parse_unit(UNIT.read_text())


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [(s, k, v) for s, keys in REQUIRED.items() for k, v in keys.items()],
)
def test_required_directive(unit: Sections, section: str, key: str, expected: str) -> None:
    assert unit[section].get(key) == [expected]


def test_protect_home(unit: Sections) -> None:
    assert unit["Service"]["ProtectHome"] in (["yes"], ["read-only"])


def test_environment(unit: Sections) -> None:
    env = unit["Service"]["Environment"]
    assert "PYTHONUNBUFFERED=1" in env
    assert "TF_CPP_MIN_LOG_LEVEL=2" in env


def test_no_memory_deny_write_execute(unit: Sections) -> None:
    # TensorFlow/XLA JIT-compiles kernels into writable+executable memory.
    assert unit["Service"].get("MemoryDenyWriteExecute", ["no"]) == ["no"]


def systemd_analyze(unit_text: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``systemd-analyze ARGS COPY`` on a copy of the unit whose ExecStart= binary exists on this machine."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (.ci/run installs Debian's systemd package)")
    stand_in = shutil.which("true") or sys.executable
    lines = unit_text.splitlines()
    exec_start = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    assert len(exec_start) == 1
    i = exec_start[0]
    lines[i] = "ExecStart=" + stand_in + " " + lines[i].removeprefix("ExecStart=").split(" ", 1)[1]
    copy = tmp_path / UNIT.name
    copy.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    return subprocess.run(
        [exe, *args, str(copy)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _verify(unit_text: str, tmp_path: Path) -> tuple[int, str]:
    proc = systemd_analyze(unit_text, tmp_path, "verify", "--man=no")
    return proc.returncode, proc.stdout + proc.stderr


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    rc, output = _verify(UNIT.read_text(), tmp_path)
    assert rc == 0, output
    bad = [line for line in output.splitlines() if BAD_OUTPUT.search(line)]
    assert not bad, output


def test_systemd_analyze_verify_catches_unknown_keys(tmp_path: Path) -> None:
    """Guards the test above: this systemd-analyze really reports a misspelt directive."""
    text = UNIT.read_text().replace("[Service]\n", "[Service]\nWatchDogSecs=60\n", 1)
    _, output = _verify(text, tmp_path)
    assert "Unknown key" in output and "WatchDogSecs" in output, output
