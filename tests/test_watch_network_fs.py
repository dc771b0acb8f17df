"""Roots and the state dir on network and FUSE file systems (issue 11, row 17), on a real FUSE mount (bindfs)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.app import App
from daemon.config import ConfigError
from daemon.fstype import file_system
from tests.conftest import make_config, seed_classes, wait_for, write_image
from tests.test_daemon_e2e import results, scrape

NOTICED = 10.0  # far below the periodic rescan (off here): without polling, a write on the share is never seen


def _fuse_missing() -> str | None:
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (.ci/run installs Debian's bindfs)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine: FUSE mounts cannot be made"
    return None


@pytest.fixture
def bindfs(tmp_path: Path) -> Iterator[Callable[[Path, Path], None]]:
    """`bindfs(share, mountpoint)` mounts `share` at `mountpoint` through FUSE, as an NFS, SMB or sshfs client
    sees a share; everything mounted is unmounted at the end."""
    missing = _fuse_missing()
    if missing:
        pytest.skip(missing)
    mounted: list[Path] = []

    def mount(share: Path, mountpoint: Path) -> None:
        share.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["bindfs", "--no-allow-other", str(share), str(mountpoint)], capture_output=True,
                              text=True, timeout=30, check=False)
        if done.returncode != 0:
            pytest.skip(f"bindfs cannot mount here: {done.stderr.strip()}")
        mounted.append(mountpoint)

    yield mount
    for mountpoint in reversed(mounted):
        for _ in range(20):  # busy for a moment while the daemon's last poll ends
            if subprocess.run(["fusermount", "-u", str(mountpoint)], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:  # still busy (a failed test left a file open): detach it, never leave a mount behind
            subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], capture_output=True, check=False)


def test_a_root_on_fuse_is_polled_and_a_write_on_the_share_side_is_seen(
    tmp_path: Path, run_app: Any, bindfs: Callable[[Path, Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    """KIND: network and FUSE file systems send no inotify event for writes made elsewhere (another machine, the
    share's own side); a root on one is detected by its file-system type (statfs) and polled, and the log says
    so. INPUT: `bindfs share data/inbox`, then an image written into `share/` (not through the mount)."""
    share, inbox = tmp_path / "share", tmp_path / "data" / "inbox"
    bindfs(share, inbox)
    assert file_system(inbox).name == "fuse" and file_system(share).name != "fuse"
    seed_classes(tmp_path, per_label=6)
    with caplog.at_level(logging.INFO), run_app(watch={"poll_interval_seconds": 0.2},
                                                classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version, what="a first model")
        write_image(share / "from-the-share.jpg", "red", seed=7)
        wait_for(lambda: results(tmp_path), timeout=NOTICED, what="the file written on the share's side")
        metrics = scrape(app)
    assert [r["file"] for r in results(tmp_path)] == ["from-the-share.jpg"]
    assert not (share / "from-the-share.jpg").exists()
    assert metrics["retraind_watch_mode{folder=inbox,mode=polling}"] == 1
    assert metrics["retraind_watch_mode{folder=classes,mode=events}"] == 1
    said = [r.getMessage() for r in caplog.records if r.name == "daemon.watcher"]
    assert any(f"inbox folder {inbox} (fuse) is polled every 0.2 s (watch.mode: auto)" in m for m in said), said


def test_a_state_dir_on_fuse_is_refused_with_one_line_naming_the_key(
    tmp_path: Path, tiny: Any, bindfs: Callable[[Path, Path], None]
) -> None:
    """KIND: SQLite's write-ahead log and locks are unsafe on network and FUSE file systems: a state dir there is
    refused at start-up with one line naming `folders.state`, before anything is written. INPUT: `bindfs
    share data/state`."""
    share = tmp_path / "share"
    bindfs(share, tmp_path / "data" / "state")
    with pytest.raises(ConfigError, match=r"^folders\.state: .* is on fuse, a network or FUSE file system") as info:
        App(make_config(tmp_path), extra_plugins=(tiny,))
    assert "\n" not in str(info.value)
    assert not list(share.iterdir())


def test_watch_mode_polling_works_anywhere_and_is_validated(tmp_path: Path, run_app: Any) -> None:
    """KIND: `watch.mode` chooses how roots are watched (`polling` for file systems that statfs cannot tell
    apart, e.g. a local mount another machine also writes); a wrong value names the key. INPUT: a local data
    root with `watch.mode: polling`; `watch.mode: sometimes`."""
    seed_classes(tmp_path, per_label=6)
    with run_app(watch={"mode": "polling", "poll_interval_seconds": 0.2},
                 classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version, what="a first model from polled classes/")
        write_image(tmp_path / "data" / "inbox" / "polled.jpg", "blue", seed=8)
        wait_for(lambda: results(tmp_path), timeout=NOTICED, what="a polled inbox file classified")
        metrics = scrape(app)
    assert metrics["retraind_watch_mode{folder=inbox,mode=polling}"] == 1
    with pytest.raises(ConfigError, match=r"^watch\.mode: 'sometimes' is not one of auto, events, polling"):
        make_config(tmp_path, watch={"mode": "sometimes"})
