"""A real daemon in a subprocess, for tests that kill it with SIGKILL or run it as another user.

`python -m tests.crash_child CONFIG [--permissions-apply]` builds the real `App` from CONFIG with two test plugins,
registered through the real hooks, notes `ready` in `<data_root>/child-events.log` once started, and runs until
SIGTERM, like `retraind run`:
- `ColourGridPlugin` provides the `colourgrid` backbone: a 2×2 grid of mean colours (12 floats) that needs no
  TensorFlow, so the process starts in well under a second, and takes a few milliseconds per image, so that a
  kill lands in the middle of bulk caching. It appends a hash of every vector it computes to
  `<data_root>/embedded.log`, from which a test proves that nothing already stored was computed again.
- `Dawdle` makes training and publishing take a moment (and notes `training`), so that kills land inside them.
With `--permissions-apply` the process gives up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH first: run as root,
it then meets file permissions like any user (a file of mode 000 cannot be read), yet keeps its own files.
Kill points between the inbox's steps (the process kills itself with SIGKILL, so the point is exact):
- `--kill-in-sink N`: in the N-th `retraind_on_result` call, after the results before it were sunk and before
  their group commit and journal close;
- `--watch-fsync`: every fsync of an inbox record (a sidecar `<image>.json`, `results.jsonl`) is noted in the
  events log as `fsync <name> <open>`, `<open>` the journal entries open for it at that moment (all of them
  for `results.jsonl`); `--kill-at-fsync N` kills right after the N-th of them, inside the group commit.
`--kill-at-unlink NAME` kills it as it is about to remove a file named NAME (the original of a move across
file systems, once its copy is in place). With `--refuse-thread NAME`, starting the thread named NAME fails once, as when the OS refuses a thread (memory,
a pids limit): a start that fails half-way.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from types import FrameType

import numpy as np

from daemon.app import App
from daemon.config import BackboneConfig, load_config
from daemon.hookspecs import hookimpl
from daemon.logs import setup_logging

SECONDS_PER_IMAGE = 0.005
TRAIN_SECONDS = 0.3
PUBLISH_SECONDS = 0.2
EVENTS_LOG, EMBEDDED_LOG = "child-events.log", "embedded.log"


def append(path: Path, text: str) -> None:
    """One write(2) on an O_APPEND file: a SIGKILL never leaves half of it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def vector_hash(vector: np.ndarray) -> str:
    """The same hash for a vector as computed here and as stored (float32 bytes) in the store."""
    return hashlib.sha1(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()


class ColourGrid:
    id, input_size, dim = "colourgrid/v1", (16, 16), 12

    def __init__(self, log: Path) -> None:
        self._log = log

    def embed(self, images: np.ndarray) -> np.ndarray:
        time.sleep(SECONDS_PER_IMAGE * len(images))  # a backbone's work, without taking a CPU from the tests
        grid = images.astype(np.float32).reshape(len(images), 2, 8, 2, 8, 3).mean(axis=(2, 4)) / 255.0
        vectors: np.ndarray = grid.reshape(len(images), self.dim)
        append(self._log, "".join(f"{vector_hash(v)}\n" for v in vectors))
        return vectors


def _plugins(root: Path) -> tuple[object, ...]:
    events = root / EVENTS_LOG

    class ColourGridPlugin:
        @hookimpl
        def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> ColourGrid | None:
            return ColourGrid(root / EMBEDDED_LOG) if config.name == "colourgrid" else None

    class Dawdle:
        @hookimpl(tryfirst=True)
        def retraind_train_head(self, dataset: object, config: object) -> None:
            append(events, "training\n")
            time.sleep(TRAIN_SECONDS)

        @hookimpl
        def retraind_write_model_artifacts(self, version: object, directory: Path) -> None:
            with (directory / "notes.txt").open("w") as fh:  # half written while a kill may come
                fh.write("a model version is published whole")
                fh.flush()
                time.sleep(PUBLISH_SECONDS)
                fh.write(" or not at all\n")

    return ColourGridPlugin(), Dawdle()


class KillInSink:
    """A sink that kills the process on its `n`-th call."""

    def __init__(self, n: int) -> None:
        self._left = n

    @hookimpl
    def retraind_on_result(self, result: object, config: object) -> None:
        self._left -= 1
        if self._left == 0:
            os.kill(os.getpid(), signal.SIGKILL)


class FsyncWatch:
    """Wraps `os.fsync` in this process (fault injection, the daemon's code untouched): notes each fsync of
    an inbox record with the journal entries open for it, and may kill the process after the `kill_at`-th."""

    def __init__(self, data: Path, kill_at: int) -> None:
        self._data, self._kill_at, self._seen = data, kill_at, 0
        self._fsync = os.fsync
        os.fsync = self._watched

    def _watched(self, fd: int) -> None:
        self._fsync(fd)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name != "results.jsonl" and not (path.suffix == ".json" and path.parent.parent.name == "outbox"):
            return
        with closing(sqlite3.connect(f"file:{self._data / 'state' / 'store.sqlite'}?mode=ro", uri=True)) as db:
            destinations = [os.path.realpath(json.loads(d)) for (d,) in db.execute("SELECT destination FROM journal")]
        entries = len(destinations) if path.name == "results.jsonl" else destinations.count(str(path.with_suffix("")))
        append(self._data / EVENTS_LOG, f"fsync {path.name} {entries}\n")
        self._seen += 1
        if self._seen == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_at_unlink(name: str) -> None:
    """Wraps `os.unlink` in this process (fault injection, the daemon's code untouched): removing a file named
    `name` kills the process with SIGKILL first."""
    unlink = os.unlink

    def killing(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        if os.path.basename(os.fspath(path)) == name:
            os.kill(os.getpid(), signal.SIGKILL)
        unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    os.unlink = killing  # type: ignore[assignment]


def refuse_thread_start(name: str) -> None:
    """Wraps `threading.Thread.start` in this process (fault injection, the daemon's code untouched): starting a
    thread named `name` raises what CPython raises when the OS refuses a thread (memory or address space
    exhausted, a pids limit), once."""
    start = threading.Thread.start

    def refusing(thread: threading.Thread) -> None:
        if thread.name == name and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        start(thread)

    refused: list[str] = []
    threading.Thread.start = refusing  # type: ignore[assignment,method-assign]


_CAP_VERSION_3, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 0x20080522, 1, 2


def drop_permission_override() -> None:
    """capset(2) without the two capabilities that let root ignore file permissions (effective and
    permitted sets of this, the only, thread; threads started later inherit them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) for capabilities 0-31, then 32-63
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0], data[1] = data[0] & keep, data[1] & keep
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--permissions-apply", action="store_true", help="give up root's permission override")
    parser.add_argument("--kill-in-sink", type=int, default=0, help="SIGKILL in the N-th retraind_on_result call")
    parser.add_argument("--watch-fsync", action="store_true", help="note each fsync of an inbox record")
    parser.add_argument("--kill-at-fsync", type=int, default=0, help="SIGKILL after the N-th noted fsync")
    parser.add_argument("--refuse-thread", default="", help="starting the thread of this name fails, once")
    parser.add_argument("--kill-at-unlink", default="", help="SIGKILL as a file of this name is removed")
    args = parser.parse_args(argv)
    if args.permissions_apply:
        drop_permission_override()
    config = load_config(args.config)
    plugins = _plugins(config.data_root) + ((KillInSink(args.kill_in_sink),) if args.kill_in_sink else ())
    if args.watch_fsync:
        FsyncWatch(config.data_root, args.kill_at_fsync)
    if args.refuse_thread:
        refuse_thread_start(args.refuse_thread)
    if args.kill_at_unlink:
        kill_at_unlink(args.kill_at_unlink)
    setup_logging(config.log_level)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    with App(config, extra_plugins=plugins):
        append(config.data_root / EVENTS_LOG, "ready\n")
        while not stop.wait(0.1):
            pass
    append(config.data_root / EVENTS_LOG, "stopped\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
