"""Logging to stderr: under systemd (JOURNAL_STREAM set) journald adds the time, so we leave it out.

TensorFlow speaks on its own: C++ log lines (absl, XLA: "Could not find cuda drivers", "cuInit ... UNKNOWN
ERROR (303)", oneDNN and CPU-feature notices), TFLite's "Created TensorFlow Lite XNNPACK delegate", the
converter's `print`s, and Python warnings. None of it is ours: `quiet_tensorflow` (before TensorFlow is
imported) and `foreign_output_as_debug` (around the code that loads it) turn all of it into DEBUG lines of the
`tensorflow.native` logger, so a CPU machine shows our own log lines only unless `log_level: DEBUG`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import TextIO

_NATIVE = logging.getLogger("tensorflow.native")
_FOREIGN_LOGGERS = ("tensorflow", "absl", "keras", "h5py")
_FOREIGN_WARNINGS = r"(tensorflow|keras|tf_keras|absl|google\.protobuf|flatbuffers|h5py)(\.|$)"


#: Control characters as escapes (a tab stays): Linux allows a newline or a terminal escape in a file name.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(32), 127) if code != 9} | {10: "\\n", 13: "\\r"}


class OneLineFormatter(logging.Formatter):
    """One record, one line: control characters in the message (a file name's newline, which would start
    a forged line of its own, or a terminal escape) are written as escapes (`\\n`, `\\x1b`). A traceback
    still follows on lines of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPES)


def setup_logging(level: str) -> None:
    fmt = "%(levelname)s %(threadName)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("watchdog", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    quiet_tensorflow(debug=root.level <= logging.DEBUG)


def quiet_tensorflow(debug: bool) -> None:
    """Keep TensorFlow's own logging and warnings out of our output unless `debug`. Call it before
    TensorFlow is imported: its C++ log level is read from the environment then (a value the user set wins)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if debug else "3")
    os.environ.setdefault("GRPC_VERBOSITY", "DEBUG" if debug else "NONE")
    for name in _FOREIGN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)
    if not debug:
        warnings.filterwarnings("ignore", module=_FOREIGN_WARNINGS)


@contextlib.contextmanager
def foreign_output_as_debug() -> Iterator[TextIO]:
    """While the block runs, whatever reaches file descriptors 1 and 2 without going through our logging
    (TensorFlow's C++ logs, the TFLite converter's prints) is collected and logged line by line at DEBUG
    afterwards; our own log records still reach stderr at once. Yields a stream on the real stderr for
    output of ours that is not logging (a progress bar). Only for blocks on the main thread before the
    daemon's threads run (building a backbone, an export): another thread's raw writes would be caught too.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as sink, os.fdopen(os.dup(saved[2]), "w", buffering=1) as stderr:
        handlers = _stderr_handlers()
        previous = [handler.stream for handler in handlers]
        for handler in handlers:
            handler.setStream(stderr)
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield stderr
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            for handler, stream in zip(handlers, previous):
                handler.setStream(stream)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    _NATIVE.debug("%s", line.rstrip())


def _stderr_handlers() -> list[logging.StreamHandler[TextIO]]:
    """Our log handlers that write to the process's stderr."""
    return [handler for handler in logging.getLogger().handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler.stream, "fileno", None) is not None and _is_fd2(handler.stream)]


def _is_fd2(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 2
    except (OSError, ValueError):  # a stream without a descriptor (pytest's capture): not the process's stderr
        return False


def short(exc: BaseException) -> str:
    """One short phrase on one line for a log line: an OSError's text without its (possibly very long) file
    names; any other message cut at 200 characters (a plugin's may hold a whole repr)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"
