"""The shipped unit for real users (issue 11, rows 14 and 16): its data layout works end to end for people and
services in the `retraind` group, and its sandbox rates at most 1.5 in `systemd-analyze security`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import image_bytes, wait_for
from tests.crash_child import EVENTS_LOG
from tests.test_systemd_unit import UNIT, parse_unit, systemd_analyze

REPO = Path(__file__).resolve().parents[1]
#: Stand-ins for what systemd and the admin provide: the `retraind` group, the dynamic user's own group, a person
#: in the group, another user who is not, and the owner of /srv/retraind (root in the unit's header). The dynamic
#: user itself is uid 0 without root's permission override (tests/crash_child.py --permissions-apply): the Python
#: here lives under /root, where no other uid may run it. Owner of nothing but its own files, it meets the same
#: permission checks as a dynamic user would.
GROUP, DAEMON, PERSON, STRANGER, ADMIN = 61990, 61991, 61992, 61993, 61994
MAX_EXPOSURE = 1.5


def _as(uid: int, groups: list[int], umask: int, command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a shell `command` as `uid` (primary group `uid`) with supplementary `groups` and `umask`."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                           f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
                           "sh", "-c", f"umask {umask:04o} && {command}"],
                          cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def base() -> Iterator[Path]:
    """A world-traversable folder outside pytest's private tmp (0700), as /srv is."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to act as the dynamic user and the people")
    path = Path(tempfile.mkdtemp(prefix="retraind-layout-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_the_units_layout_lets_group_members_share_the_data_root(base: Path) -> None:
    """KIND: with the shipped unit (DynamicUser, StateDirectory), people and other services must be able to
    drop images and read results: the unit's group, umask and writable data root make every folder and file
    the daemon creates group-shared (setgid 2770 folders, 0660 files), nobody outside the group sees them, and
    a file its owner kept private is rejected, not lost. INPUT: the install steps of the unit's header
    (`install -d -o root -g retraind -m 2770`), the daemon run as another user with the unit's
    SupplementaryGroups and UMask, a person of the group (umask 022) dropping training and inbox images."""
    service = parse_unit(UNIT.read_text())["Service"]
    umask = int(service["UMask"][0], 8)
    daemon_groups = [GROUP] if service.get("SupplementaryGroups") == ["retraind"] else []
    srv, state = base / "srv", base / "state"
    srv.mkdir()
    os.chown(srv, ADMIN, GROUP)
    srv.chmod(0o2770)  # the unit header's `install -d -o root -g retraind -m 2770 /srv/retraind`
    state.mkdir(mode=0o700)  # what StateDirectory= gives the dynamic user
    config = base / "config.yaml"
    config.write_text(f"data_root: {srv}\nfolders: {{state: {state}}}\n"
                      "backbone: {name: colourgrid, batch_size: 8}\ntraining: {quiet_period_seconds: 0.2}\n"
                      "watch: {settle_seconds: 0.1, rescan_interval_seconds: 0}\n"
                      "classify: {confidence_threshold: 0.0}\nhttp: {enabled: false}\n"
                      "split: {validation_percentage: 20, testing_percentage: 0}\n")
    os.chown(config, 0, GROUP)
    config.chmod(0o640)
    images = base / "images"
    images.mkdir(mode=0o755)
    for label in ("red", "blue"):
        for i in range(4):
            (images / f"{label}-{i}.jpg").write_bytes(image_bytes(label, seed=i))
    (images / "x.jpg").write_bytes(image_bytes("red", seed=99))
    for image in images.iterdir():
        image.chmod(0o644)

    groups = f"--groups={GROUP}" if daemon_groups else "--clear-groups"
    log = (base / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        ["setpriv", f"--regid={DAEMON}", groups, "sh", "-c",
         f'umask {umask:04o} && exec "$0" -m tests.crash_child "$1" --permissions-apply', sys.executable,
         str(config)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(lambda: ((srv / EVENTS_LOG).exists() and "ready" in (srv / EVENTS_LOG).read_text())
                 or daemon.poll() is not None, what="the daemon to start")
        assert daemon.poll() is None, (base / "daemon.log").read_text()[-3000:]
        dropped = _as(PERSON, [GROUP], 0o022, "mkdir classes/red classes/blue && cp ../images/red-* classes/red/ "
                      "&& cp ../images/blue-* classes/blue/", srv)
        assert dropped.returncode == 0, dropped.stderr
        wait_for(lambda: (state / "models" / "CURRENT").exists(), what="a first model")
        dropped = _as(PERSON, [GROUP], 0o022, "cp ../images/x.jpg inbox/ && umask 077 && cp ../images/x.jpg "
                      "inbox/private.jpg", srv)
        assert dropped.returncode == 0, dropped.stderr
        wait_for(lambda: (srv / "results.jsonl").exists() and list((srv / "rejected").glob("private.jpg*")),
                 what="the shared image classified and the private one rejected")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        log.close()
    (record,) = [json.loads(line) for line in (srv / "results.jsonl").read_text().splitlines()]
    for folder in ("classes", "inbox", "outbox", "review", "rejected", f"outbox/{record['label']}"):
        st = (srv / folder).stat()
        assert (st.st_gid, oct(st.st_mode & 0o7777)) == (GROUP, oct(0o2770)), folder
    for made in (srv / "results.jsonl", Path(record["destination"] + ".json")):
        st = made.stat()
        assert (st.st_gid, oct(st.st_mode & 0o777)) == (GROUP, oct(0o660)), made
    used = _as(PERSON, [GROUP], 0o022, f"cat results.jsonl '{record['destination']}.json' >/dev/null && "
               f"rm '{record['destination']}' && cat rejected/private.jpg.error.json", srv)
    assert used.returncode == 0, used.stderr
    assert json.loads(used.stdout)["reason"] == "unreadable"
    outsider = _as(STRANGER, [], 0o022, "ls inbox", srv)
    assert outsider.returncode != 0 and "Permission denied" in outsider.stderr


def test_security_exposure_is_at_most_1_5_and_every_open_directive_is_explained(tmp_path: Path) -> None:
    """KIND: the shipped unit's sandbox is as tight as the daemon allows: `systemd-analyze security --offline=yes`
    rates it at most 1.5, and each directive that report still lists as open has a comment in the unit saying
    what in the daemon needs it. INPUT: the shipped unit, as installed."""
    done = systemd_analyze(UNIT.read_text(), tmp_path, "security", "--offline=yes", "--no-pager")
    report = done.stdout + done.stderr
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report)
    assert exposure is not None, report
    assert float(exposure.group(1)) <= MAX_EXPOSURE, report
    comments = "\n".join(line for line in UNIT.read_text().splitlines() if line.startswith("#"))
    # one line per check; open ones start with ✗ (or "-" where the locale has no UTF-8, as under LC_ALL=C)
    checks = re.finditer(r"^(?:✗|-) (\S+)", report, re.MULTILINE)
    open_ones = {re.split(r"[=/]", check.group(1))[0] for check in checks}
    assert open_ones, report
    unexplained = [name for name in sorted(open_ones)
                   if not re.search(rf"^#\s+.*\b{name}\b", comments, re.MULTILINE)]
    assert not unexplained, f"left open without a comment saying why: {unexplained}\n{report}"
