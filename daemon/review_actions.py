"""A reviewer's decisions as journalled, atomic file moves, with undo.

Every decision (label a review image, reject it, move a suspect training image to another label, remove it
from training, keep it) is planned in full first — each move `source → destination` (a free name at the
destination, never overwriting), each record to write, each sidecar to remove with its content — then the
plan is journalled in the store (`review_actions`), then carried out with `daemon.atomic.move_atomic` (the
same move the inbox uses), then marked done. A crash between the journal and `done` is finished by
`recover()` at start-up; each step is idempotent (a move whose source is gone and destination present is
done). Undo carries out the same plan backwards, journalled the same way (`undoing` → `undone`).

Moving a file into `classes/<label>/` is what teaches the daemon: the watcher sees it arrive, the indexer
caches its bottleneck (already in the store when the image came through the inbox), and the trainer
retrains after its quiet period. Nothing here calls the trainer.

Thread-safety: one lock; callers are the HTTP API's worker threads.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.atomic import free_name, move_atomic, write_atomic
from daemon.indexer import label_of, label_problem
from daemon.metrics import Metrics
from daemon.store import ReviewActionRow, Store

log = logging.getLogger(__name__)

#: What each kind of decision does: label/reject act on review images, move/remove/keep on training images.
KINDS = ("label", "reject", "move", "remove", "keep")
_MAX_NAME_BYTES = 255


class ActionRefused(ValueError):
    """A decision that cannot be carried out as asked (a bad label, a file that is gone); nothing moved."""


class ActionFailed(OSError):
    """A decision the file system refused half-way (a read-only folder, a full disk); what it had done is undone
    (or, if that fails too, finished at the next start). The message names the file and the cause."""


@dataclass
class Plan:
    """What one decision does to the file system. Paths are absolute; `removed` keeps each removed file's
    text so that undo can put it back."""

    moves: list[tuple[Path, Path]] = field(default_factory=list)
    written: dict[Path, str] = field(default_factory=dict)
    removed: dict[Path, str] = field(default_factory=dict)
    subject: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "moves": [[os.fspath(s), os.fspath(d)] for s, d in self.moves],
            "written": {os.fspath(p): text for p, text in self.written.items()},
            "removed": {os.fspath(p): text for p, text in self.removed.items()},
            "subject": self.subject,
        })

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = json.loads(text)
        return cls([(Path(s), Path(d)) for s, d in raw["moves"]],
                   {Path(p): t for p, t in raw["written"].items()},
                   {Path(p): t for p, t in raw["removed"].items()}, raw.get("subject", {}))


def check_label(label: object) -> str:
    """A label is a folder name under `classes/`: non-empty text, no path separator, not hidden (a leading dot:
    hidden and tool folders are never labels), no surrounding blanks, no control character (`label_problem`), at
    most 255 bytes. Returns it in composed form (`label_of`). Raises ActionRefused."""
    if not isinstance(label, str) or not label or label != label.strip():
        raise ActionRefused("label: give a non-empty name without leading or trailing blanks")
    if "/" in label or "\\" in label or "\0" in label or label.startswith("."):
        raise ActionRefused(f"label {label!r}: a label is one folder name: no '/', '\\\\' or leading '.'")
    problem = label_problem(label)
    if problem is not None:
        raise ActionRefused(f"label {label!r} {problem}")
    if len(os.fsencode(label)) > _MAX_NAME_BYTES:
        raise ActionRefused(f"label: at most {_MAX_NAME_BYTES} bytes")
    return label_of(label)


def sidecar_of(path: Path) -> Path:
    """The record written beside a filed image (`<name>.json`, see plugins/file_sinks.py)."""
    return path.with_name(path.name + ".json")


def error_record_of(path: Path) -> Path:
    """The record beside a rejected file (`<name>.error.json`)."""
    return path.with_name(path.name + ".error.json")


class ReviewActions:
    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store, self._metrics = store, metrics
        self._lock = threading.Lock()

    def carry_out(self, kind: str, plan: Plan) -> int:
        """Journal `plan`, carry it out, mark it done; returns its sequence number (for undo)."""
        with self._lock:
            seq = self._store.review_begin(kind, plan.to_json())
            try:
                _do(plan)
            except OSError as exc:
                raise self._failed(seq, plan, exc) from exc
            self._store.review_set_state(seq, "done")
        self._metrics.review_actions.labels(action=kind).inc()
        log.info("review: %s %s", kind, ", ".join(f"{s.name} -> {d.parent.name}/" for s, d in plan.moves)
                 or json.dumps(plan.subject))
        return seq

    def _failed(self, seq: int, plan: Plan, exc: OSError) -> ActionFailed:
        """Undo what decision `seq` did before `exc`; the error to answer with."""
        where = f"{exc.filename}: " if exc.filename else ""
        try:
            _undo(plan)
        except OSError:
            log.exception("review: decision #%d failed (%s%s) and cannot be undone now; the next start finishes it",
                          seq, where, exc.strerror or exc)
            return ActionFailed(f"{where}{exc.strerror or exc}; the decision is finished at the next start")
        self._store.review_set_state(seq, "undone")
        log.error("review: decision #%d failed and was undone: %s%s", seq, where, exc.strerror or exc)
        return ActionFailed(f"{where}{exc.strerror or exc}; nothing was changed: try again once that is mended")

    def undo(self) -> ReviewActionRow | None:
        """Undo the newest decision still done; None when there is nothing to undo."""
        with self._lock:
            done = self._store.review_actions(("done",))
            if not done:
                return None
            row = done[0]
            self._store.review_set_state(row.seq, "undoing")
            gone = _undo(Plan.from_json(row.plan))
            self._store.review_set_state(row.seq, "undone")
        self._metrics.review_actions.labels(action="undo").inc()
        log.info("review: undid %s #%d", row.kind, row.seq)
        for path in gone:
            log.warning("review: undo of #%d cannot bring back %s: it was deleted or moved since", row.seq, path)
        return row

    def kept(self) -> set[tuple[str, str]]:
        """(path under classes/, sha256) of training images a reviewer chose to keep as they are."""
        return {(row_plan.subject["path"], row_plan.subject["sha256"])
                for row_plan in (Plan.from_json(r.plan) for r in self._store.review_actions(("done",))
                                 if r.kind == "keep")}

    def recover(self) -> int:
        """Finish decisions a stop interrupted (at start-up, before the API serves); returns how many."""
        open_rows = self._store.review_actions(("doing", "undoing"))
        for row in reversed(open_rows):
            plan = Plan.from_json(row.plan)
            if row.state == "doing":
                _do(plan)
                self._store.review_set_state(row.seq, "done")
            else:
                _undo(plan)
                self._store.review_set_state(row.seq, "undone")
        return len(open_rows)


def plan_moves(pairs: list[tuple[Path, Path]], tag: str) -> list[tuple[Path, Path]]:
    """Each (source, destination folder) as a move to a free name in that folder (a name taken there gets
    `-<tag>[-n]`), with the names this plan already chose counted as taken."""
    moves: list[tuple[Path, Path]] = []
    taken: set[Path] = set()
    for source, folder in pairs:
        destination = free_name(folder, source.name, tag, taken=taken)
        taken.add(destination)
        moves.append((source, destination))
    return moves


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _move(source: Path, destination: Path) -> None:
    """Move `source` to `destination` unless it is gone or done. A source whose destination already holds its
    bytes is what a stop left between a move's copy across file systems and the removal of the original (at
    most one unlink apart): the move is finished by removing it, so the file is in one place."""
    if not os.path.lexists(source):
        return
    if not os.path.lexists(destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
        move_atomic(source, destination)
    elif _same_bytes(source, destination):
        source.unlink()


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _do(plan: Plan) -> None:
    for source, destination in plan.moves:
        _move(source, destination)
    for path in plan.removed:
        path.unlink(missing_ok=True)
    for path, text in plan.written.items():
        write_atomic(path, text.encode("utf-8", "surrogateescape"))


def _undo(plan: Plan) -> list[Path]:
    """Replay `plan` backwards (again after a stop: every step looks first); returns the moved files that
    are gone since (deleted or moved away by hand): they stay gone, and so do their records."""
    gone = []
    for path in plan.written:
        path.unlink(missing_ok=True)
    for source, destination in reversed(plan.moves):
        if not os.path.lexists(destination) and not os.path.lexists(source):
            gone.append(destination)
        if (os.path.lexists(source) and os.path.lexists(destination)  # its old name was taken meanwhile
                and not _same_bytes(source, destination)):  # (not by this undo's own copy: `_move` ends it)
            source = free_name(source.parent, source.name, "undone")
        _move(destination, source)
    for path, text in plan.removed.items():  # the records (`sidecar_of`) of moved images
        if not os.path.lexists(path) and os.path.lexists(path.with_name(path.name.removesuffix(".json"))):
            write_atomic(path, text.encode("utf-8", "surrogateescape"))
    return gone
