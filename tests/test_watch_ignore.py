"""Folders that tools, trash cans, NAS systems and OS archives create among people's images (issue 11, row 5)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError
from daemon.ignore import DEFAULT_IGNORE, below
from tests.conftest import image_bytes, make_config, seed_classes, wait_for, write_image
from tests.test_daemon_e2e import results

#: Where such folders appear, each with an image inside that would otherwise be a label or a training image.
TOOL_FOLDERS = (
    ".ipynb_checkpoints/red-0-checkpoint.jpg",      # Jupyter
    ".Trash-1000/files/old.jpg",                    # freedesktop trash on a removable drive
    "@eaDir/x.jpg/SYNOPHOTO_THUMB_M.jpg",           # Synology thumbnails
    "#recycle/deleted.jpg",                         # Synology trash can
    ".AppleDouble/photo.jpg",                       # netatalk (AFP shares)
    "__MACOSX/red/._photo.jpg",                     # a zip made on macOS
    ".thumbnails/normal/abc.png",                   # freedesktop thumbnails
    "lost+found/#1234.jpg",                         # fsck
    ".snapshot/hourly.0/old.jpg",                   # NetApp/NAS snapshots
    "$RECYCLE.BIN/S-1-5-21/$R0001.jpg",             # Windows trash can on a shared drive
    "System Volume Information/tracking.jpg",       # Windows volume metadata
    "._IMG_0001.jpg",                               # macOS's resource fork beside a file copied to a share
    ".hidden-photo.jpg",                            # any hidden name
)


def test_tool_trash_and_nas_folders_are_never_labels_nor_images(tmp_path: Path, run_app: Any) -> None:
    """KIND: folders that tools, trash cans, NAS systems and OS archives put among people's files are neither
    labels (top level of classes/), nor training images (inside a label), nor images to classify (inbox/),
    whether they were there at start-up or appear while the daemon runs. INPUT: each folder of TOOL_FOLDERS with
    an image in it, at the top of classes/, inside a label, and in inbox/, before and after start."""
    data = tmp_path / "data"
    seed_classes(tmp_path, per_label=8)
    for i, rel in enumerate(TOOL_FOLDERS):  # before start: the start-up scan must leave them out
        write_image(data / "classes" / rel, "green", seed=100 + i)
        write_image(data / "classes" / "red" / rel, "blue", seed=200 + i)
        write_image(data / "inbox" / rel, "red", seed=300 + i)
    with run_app(classify={"confidence_threshold": 0.0}) as app:
        version = wait_for(lambda: app.serving.version, what="a first model")
        for i, rel in enumerate(TOOL_FOLDERS):  # while running: events must leave them out too
            write_image(data / "classes" / "blue" / "later" / rel, "green", seed=400 + i)
            write_image(data / "inbox" / "later" / rel, "blue", seed=500 + i)
        write_image(data / "inbox" / "real.jpg", "red", seed=600)
        wait_for(lambda: results(tmp_path), what="the one real inbox image classified")
        wait_for(app.pipeline.idle.is_set, what="an idle pipeline")
        catalog = set(app.store.catalog())
    assert version.labels == ("blue", "red")
    assert catalog == {f"{label}/{label}-{i}.jpg" for label in ("red", "blue") for i in range(8)}
    assert [r["file"] for r in results(tmp_path)] == ["real.jpg"]
    for rel in TOOL_FOLDERS:  # left where they are, untouched
        assert (data / "inbox" / rel).exists() and (data / "inbox" / "later" / rel).exists()
    assert not os.listdir(data / "rejected")


def test_ignore_patterns_are_configurable_and_validated(tmp_path: Path, run_app: Any) -> None:
    """KIND: the ignore list is the user's: their own patterns replace the default (a glob per folder or file
    name, any depth, case-insensitive), and a pattern that cannot work is a config error naming the key.
    INPUT: `watch.ignore: ['drafts', '*.RAW.jpg']` with a `drafts/` label and such files; then bad patterns."""
    data = tmp_path / "data"
    seed_classes(tmp_path, per_label=8)
    write_image(data / "classes" / "Drafts" / "d.jpg", "green", seed=1)
    write_image(data / "classes" / "red" / "x.raw.jpg", "blue", seed=2)
    write_image(data / "classes" / "red" / ".hidden" / "h.jpg", "red", seed=3)  # `.*` is no longer in the list
    with run_app(watch={"ignore": ["drafts", "*.RAW.jpg"]}) as app:
        version = wait_for(lambda: app.serving.version, what="a first model")
        catalog = set(app.store.catalog())
    assert version.labels == ("blue", "red")
    assert "red/.hidden/h.jpg" in catalog and "red/x.raw.jpg" not in catalog
    for bad, problem in ((["a/b"], "has a '/'"), ([""], "empty pattern"), (["ok", "**"], "matches every name")):
        with pytest.raises(ConfigError, match=rf"watch\.ignore\[{len(bad) - 1}\]: .*{problem}"):
            make_config(tmp_path, watch={"ignore": bad})
    assert make_config(tmp_path).watch.ignore == list(DEFAULT_IGNORE)


def test_below_agrees_with_relative_to() -> None:
    """`below` is the fast form of `Path.relative_to` the inbox's hot path uses: a sibling whose name starts
    like the root's, the root itself and a path outside are not below it; odd bytes in names survive."""
    root = Path("/data/inbox")
    cases = [root / "a.jpg", root / "sub" / "b.jpg", root, Path("/data/inbox2/a.jpg"), Path("/data/inbo"),
             Path("/data"), Path("/other/inbox/a.jpg"), root / os.fsdecode(b"caf\xe9.jpg")]
    for path in cases:
        expected = str(path.relative_to(root)) if path.is_relative_to(root) and path != root else None
        assert below(path, root) == expected, path
    assert below(Path("/x/y"), Path("/")) == "x/y"


def test_a_download_paused_in_the_inbox_stays_its_writers_until_renamed(tmp_path: Path, run_app: Any) -> None:
    """KIND: browsers and download tools write under a working name (`*.part`, `*.crdownload`, `*.download`,
    `*.partial`, `*.tmp`) and rename the file when it is complete; a paused download keeps that name for
    minutes or days. Such a name used to be taken after 10 × `watch.settle_seconds`: the half file was
    rejected and moved out of the inbox, so the browser could not resume it. INPUT: half a JPEG as
    `photo.jpg.part` and as `Unconfirmed 1234.crdownload` in the inbox beside a complete image; both are left
    untouched well past that wait, and the finished download, renamed into place, is classified."""
    data = tmp_path / "data"
    seed_classes(tmp_path, per_label=8)
    whole = image_bytes("red", 7)
    with run_app(watch={"settle_seconds": 0.1}, classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version, what="a first model")
        paused = [data / "inbox" / "photo.jpg.part", data / "inbox" / "Unconfirmed 1234.crdownload"]
        for path in paused:
            path.write_bytes(whole[: len(whole) // 2])
        write_image(data / "inbox" / "real.jpg", "blue", seed=8)
        wait_for(lambda: results(tmp_path), what="the complete image classified")
        time.sleep(2.0)  # 20 × settle_seconds: twice the wait after which working names used to be taken
        wait_for(app.pipeline.idle.is_set, what="an idle pipeline")
        assert all(path.read_bytes() == whole[: len(whole) // 2] for path in paused)
        assert not os.listdir(data / "rejected")
        paused[0].write_bytes(whole)
        os.replace(paused[0], data / "inbox" / "photo.jpg")
        wait_for(lambda: len(results(tmp_path)) == 2, what="the finished download classified")
    assert [r["file"] for r in results(tmp_path)] == ["real.jpg", "photo.jpg"]
    assert (data / "inbox" / "Unconfirmed 1234.crdownload").exists()


def test_a_firefox_download_placeholder_waits_for_its_part_file(tmp_path: Path, run_app: Any) -> None:
    """KIND: Firefox starts a download by creating an empty placeholder under the final name (`photo.jpg`, 0
    bytes, closed at once) beside the file it fills (`photo.jpg.part`), and renames the `.part` onto the
    placeholder when done. The placeholder used to be taken at its close and rejected as `empty`: every
    download into the inbox left a spurious `rejected/photo.jpg` and counted a reject. INPUT: that pair in
    the inbox, left well past the settle wait, then the finished `.part` renamed onto the placeholder; and a
    cancelled download (`gone.jpg` whose `.part` is deleted), whose empty placeholder is rejected as before."""
    data = tmp_path / "data"
    seed_classes(tmp_path, per_label=8)
    whole = image_bytes("red", 7)
    with run_app(watch={"settle_seconds": 0.1}, classify={"confidence_threshold": 0.0}) as app:
        wait_for(lambda: app.serving.version, what="a first model")
        inbox = data / "inbox"
        for name in ("photo.jpg", "gone.jpg"):
            (inbox / name).write_bytes(b"")
            (inbox / f"{name}.part").write_bytes(whole[: len(whole) // 2])
        write_image(inbox / "real.jpg", "blue", seed=8)
        wait_for(lambda: results(tmp_path), what="the complete image classified")
        time.sleep(2.0)  # 20 x settle_seconds: the placeholders were taken at once before
        assert not os.listdir(data / "rejected")
        assert (inbox / "photo.jpg").stat().st_size == 0 and (inbox / "gone.jpg").exists()
        (inbox / "photo.jpg.part").write_bytes(whole)
        os.replace(inbox / "photo.jpg.part", inbox / "photo.jpg")
        wait_for(lambda: len(results(tmp_path)) == 2, what="the finished download classified")
        (inbox / "gone.jpg.part").unlink()
        wait_for(lambda: (data / "rejected" / "gone.jpg").exists(), what="the cancelled placeholder rejected")
    assert [r["file"] for r in results(tmp_path)] == ["real.jpg", "photo.jpg"]
    assert sorted(os.listdir(data / "rejected")) == ["gone.jpg", "gone.jpg.error.json"]
    assert '"empty"' in (data / "rejected" / "gone.jpg.error.json").read_text()
