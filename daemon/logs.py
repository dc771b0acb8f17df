"""Logging to stderr: under systemd (JOURNAL_STREAM set) journald adds the time, so we leave it out."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str) -> None:
    fmt = "%(levelname)s %(threadName)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("watchdog", "PIL", "matplotlib", "h5py", "absl"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
