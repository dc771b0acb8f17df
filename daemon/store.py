"""The embedded store (SQLite, WAL): bottlenecks keyed by content, the training-file catalog, the inbox journal.

SQLite gives atomic, durable commits, so a power cut never leaves half an entry; every vector also carries a
CRC32 checked on read, and a vector that fails it is treated as missing and recomputed.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.config import ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bottlenecks (
    sha256 TEXT NOT NULL, backbone TEXT NOT NULL, variant TEXT NOT NULL,
    vector BLOB NOT NULL, crc INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (sha256, backbone, variant)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, label TEXT NOT NULL, sha256 TEXT, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ok INTEGER NOT NULL, ctime_ns INTEGER NOT NULL DEFAULT 0,
    inode INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, destination TEXT NOT NULL, record TEXT NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL, source_stat TEXT NOT NULL DEFAULT '') WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS review_actions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, plan TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL);
"""
#: Columns added since a table was first made: a store written by an older version gains them at open (their
#: defaults make every catalog file look changed once, so it is hashed again, never run through the backbone)
_ADDED_COLUMNS = {
    "files": {"ctime_ns": "INTEGER NOT NULL DEFAULT 0", "inode": "INTEGER NOT NULL DEFAULT 0"},
    "journal": {"source_stat": "TEXT NOT NULL DEFAULT ''"},
}
_FILE_COLUMNS = "path, label, sha256, size, mtime_ns, ok, ctime_ns, inode"

ORIGINAL = ""  # the `variant` of an undistorted image's bottleneck
STORE_FILE = "store.sqlite"  # its name in the state dir


def file_signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells that a file may have changed: size, mtime, ctime and inode. An mtime can be put back
    (`touch -r`, `cp -p`, `rsync -t`, a photo tool that keeps dates) but the ctime is set by the kernel on
    every write and metadata change, and a file replaced by a rename has another inode."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


@dataclass(frozen=True)
class CatalogEntry:
    """A training file as last seen: `path` is relative to `classes/`, `ok` False for unusable content."""

    path: str
    label: str
    sha256: str | None
    size: int
    mtime_ns: int
    ok: bool
    ctime_ns: int = 0
    inode: int = 0

    @classmethod
    def seen(cls, path: str, label: str, sha256: str | None, st: os.stat_result, ok: bool) -> CatalogEntry:
        return cls(path, label, sha256, st.st_size, st.st_mtime_ns, ok, st.st_ctime_ns, st.st_ino)

    @property
    def signature(self) -> tuple[int, int, int, int]:
        """`file_signature` of the file when this entry was made."""
        return self.size, self.mtime_ns, self.ctime_ns, self.inode

    def unusable(self) -> CatalogEntry:
        return dataclasses.replace(self, ok=False)


@dataclass(frozen=True)
class ReviewActionRow:
    """A reviewer's decision (`daemon/review_actions.py`): `plan` is its JSON (the moves and the records to
    write or restore); `state` goes `doing` → `done` → `undoing` → `undone`."""

    seq: int
    kind: str
    plan: str
    state: str


@dataclass(frozen=True)
class JournalEntry:
    """An inbox file whose move to `destination` is decided; `state` is `moving` until its sinks ran."""

    id: str
    source: str
    destination: str
    record: str
    state: str
    #: the source's (st_dev, st_ino, st_ctime_ns) as JSON when the move was decided: recovery removes a source
    #: left behind by a copy only if it is still that very file, never a new one dropped under its name
    source_stat: str = ""


#: SQLite's answers for a file that is not a database, or one damaged past opening
_DAMAGED = (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)


class Store:
    """One SQLite database; each thread gets its own connection (SQLite connections are not shareable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writes = 0  # write transactions committed through this object (`generation`)
        try:
            self._db().executescript(_SCHEMA)
            self._add_columns()
        except sqlite3.DatabaseError as exc:
            self.close()
            if getattr(exc, "sqlite_errorcode", None) not in _DAMAGED:  # locked, I/O, permissions: not damage
                raise
            raise ConfigError(
                f"folders.state: {path} cannot be opened as a SQLite database ({exc}); it holds the bottleneck "
                "cache, the training catalog and the inbox journal: restore it from a backup, or move it aside to "
                "start afresh (bottlenecks are computed again; an inbox file whose filing a crash interrupted "
                "may then lack its record)") from exc

    def _add_columns(self) -> None:
        db = self._db()
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error:
                db.close()
                raise
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        with self._lock:  # after the commit: a generation taken before it differs from every later one
            self._writes += 1

    def generation(self) -> tuple[int, int, int]:
        """A token of what this thread may read: equal tokens taken on one thread mean nothing was committed
        to the database in between (by this object, SQLite's `data_version` of this thread's connection for
        every other connection and process, and the thread itself). Take it before a read, so that a commit
        racing the read makes the next token differ."""
        with self._lock:
            writes = self._writes
        version = int(self._db().execute("PRAGMA data_version").fetchone()[0])
        return writes, version, threading.get_ident()

    def close(self) -> None:
        with self._lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()

    # -- bottlenecks -------------------------------------------------------------------------------------

    def put_bottlenecks(self, backbone: str, items: Iterable[tuple[str, str, np.ndarray]],
                        files: Iterable[CatalogEntry] = ()) -> None:
        """Store (sha256, variant, vector) triples for `backbone`, and add or replace the catalog entries `files`
        (a caching chunk's rows, whose bottlenecks these are), in one transaction: one commit and one WAL
        fsync for both."""
        rows, entries = _bottleneck_rows(backbone, items), _file_rows(files)
        if rows or entries:
            with self._tx() as db:
                db.executemany(_PUT_BOTTLENECK, rows)
                db.executemany(_UPSERT_FILE, entries)

    def missing_bottlenecks(self, backbone: str, shas: Iterable[str], variant: str = ORIGINAL) -> set[str]:
        """Which of `shas` have no valid bottleneck yet for `backbone`."""
        wanted = set(shas)
        found = self.get_bottlenecks(backbone, wanted, variant)
        return wanted - set(found)

    def get_bottlenecks(self, backbone: str, shas: Iterable[str], variant: str = ORIGINAL) -> dict[str, np.ndarray]:
        """Valid vectors by sha256; entries failing their CRC are left out (and so get recomputed)."""
        out: dict[str, np.ndarray] = {}
        query = "SELECT sha256, vector, crc FROM bottlenecks WHERE backbone=? AND variant=? AND sha256=?"
        db = self._db()
        for sha in shas:
            row = db.execute(query, (backbone, variant, sha)).fetchone()
            if row is not None and zlib.crc32(row[1]) == row[2]:
                out[sha] = np.frombuffer(row[1], dtype=np.float32)
        return out

    def count_bottlenecks(self, backbone: str | None = None) -> int:
        if backbone is None:
            return int(self._db().execute("SELECT COUNT(*) FROM bottlenecks").fetchone()[0])
        query = "SELECT COUNT(*) FROM bottlenecks WHERE backbone=?"
        return int(self._db().execute(query, (backbone,)).fetchone()[0])

    def drop_bottlenecks(self, backbone: str) -> int:
        """Drop every vector of `backbone` (a migration away from it is over); returns how many went."""
        with self._tx() as db:
            return int(db.execute("DELETE FROM bottlenecks WHERE backbone = ?", (backbone,)).rowcount)

    def prune_bottlenecks(self, older_than_seconds: float) -> int:
        """Drop vectors no catalog file refers to, once they are older than the given age."""
        cutoff = time.time() - older_than_seconds
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM bottlenecks WHERE created < ? AND sha256 NOT IN "
                "(SELECT sha256 FROM files WHERE sha256 IS NOT NULL)",
                (cutoff,),
            )
            return cur.rowcount

    def variant_vectors(self, backbone: str, prefix: str) -> dict[tuple[str, str], np.ndarray]:
        """Valid vectors of `backbone`'s variants whose key starts with `prefix`, by (sha256, variant)."""
        rows = self._db().execute(
            "SELECT sha256, variant, vector, crc FROM bottlenecks "
            "WHERE backbone = ? AND substr(variant, 1, ?) = ?", (backbone, len(prefix), prefix))
        return {(sha, variant): np.frombuffer(blob, dtype=np.float32)
                for sha, variant, blob, crc in rows if zlib.crc32(blob) == crc}

    def prune_variants(self, backbone: str, keep: set[tuple[str, str]]) -> int:
        """Drop `backbone`'s distorted variants not in `keep` (old recipes, images no longer trained on);
        originals are left to `prune_bottlenecks`."""
        with self._tx() as db:
            rows = db.execute("SELECT sha256, variant FROM bottlenecks WHERE backbone = ? AND variant != ?",
                              (backbone, ORIGINAL)).fetchall()
            stale = [(sha, backbone, variant) for sha, variant in rows if (sha, variant) not in keep]
            db.executemany("DELETE FROM bottlenecks WHERE sha256 = ? AND backbone = ? AND variant = ?", stale)
        return len(stale)

    # -- training-file catalog ---------------------------------------------------------------------------

    def upsert_file(self, entry: CatalogEntry) -> None:
        self.upsert_files([entry])

    def upsert_files(self, entries: Iterable[CatalogEntry]) -> None:
        """Add or replace catalog entries in one transaction (a caching chunk's: `put_bottlenecks`, with their
        vectors)."""
        self.put_bottlenecks("", (), entries)

    def remove_files(self, path: str) -> int:
        """Forget `path` and everything below it (a deleted folder); returns how many entries went."""
        with self._tx() as db:
            prefix = path.rstrip("/") + "/"
            cur = db.execute(
                "DELETE FROM files WHERE path = ? OR substr(path, 1, ?) = ?", (path, len(prefix), prefix)
            )
            return cur.rowcount

    def catalog_entry(self, path: str) -> CatalogEntry | None:
        row = self._db().execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE path = ?", (path,)).fetchone()
        return None if row is None else _entry(row)

    def paths_missing_bottleneck(self, backbone: str) -> list[str]:
        """Usable catalog files with no vector for `backbone` (after a backbone switch)."""
        rows = self._db().execute(
            "SELECT path FROM files f WHERE ok = 1 AND NOT EXISTS (SELECT 1 FROM bottlenecks b WHERE "
            "b.sha256 = f.sha256 AND b.backbone = ? AND b.variant = ?)", (backbone, ORIGINAL)).fetchall()
        return [r[0] for r in rows]

    def count_cached(self, backbone: str) -> tuple[int, int]:
        """(usable catalog files with a vector for `backbone`, usable catalog files): how far a re-cache under a
        new backbone id is. One index lookup per file (100k files: tens of ms)."""
        cached, total = self._db().execute(
            "SELECT COALESCE(SUM(EXISTS (SELECT 1 FROM bottlenecks b WHERE b.sha256 = f.sha256 AND b.backbone = ? "
            "AND b.variant = ?)), 0), COUNT(*) FROM files f WHERE ok = 1", (backbone, ORIGINAL)).fetchone()
        return int(cached), int(total)

    def catalog_signatures(self) -> dict[str, tuple[int, int, int, int]]:
        """`file_signature` of every catalog file as last seen, by path: what a reconcile scan compares
        (lighter than `catalog()` on a large tree)."""
        return {path: (size, mtime, ctime, inode) for path, size, mtime, ctime, inode in
                self._db().execute("SELECT path, size, mtime_ns, ctime_ns, inode FROM files")}

    def hashes(self) -> dict[str, str | None]:
        """The content hash (sha256 hex, None for unreadable content) of every catalog file by path: lighter
        than `catalog()` (10k rows: 10 ms, not 300 ms)."""
        return dict(self._db().execute("SELECT path, sha256 FROM files").fetchall())

    def catalog(self) -> dict[str, CatalogEntry]:
        rows = self._db().execute(f"SELECT {_FILE_COLUMNS} FROM files").fetchall()
        return {row[0]: _entry(row) for row in rows}

    def training_matrix(self, backbone: str, dim: int) -> tuple[list[CatalogEntry], np.ndarray]:
        """Usable catalog entries (path order) with a valid bottleneck, and their vectors as one matrix.

        The vectors are read in the table's own order and placed by content hash: fetching each through a
        join in path order is random I/O (50k rows: 1.7 s against 0.6 s), and its count ran the join twice."""
        db = self._db()
        db.execute("BEGIN")  # one snapshot for both reads
        try:
            files = db.execute(
                "SELECT path, label, sha256, size, mtime_ns FROM files WHERE ok = 1 ORDER BY path").fetchall()
            rows_of: dict[str, list[int]] = {}
            for row, file in enumerate(files):
                rows_of.setdefault(file[2], []).append(row)
            matrix = np.empty((len(files), dim), dtype=np.float32)
            found = np.zeros(len(files), dtype=bool)
            query = "SELECT sha256, vector, crc FROM bottlenecks WHERE backbone = ? AND variant = ?"
            for sha, blob, crc in db.execute(query, (backbone, ORIGINAL)):
                rows = rows_of.get(sha)
                if rows and len(blob) == dim * 4 and zlib.crc32(blob) == crc:
                    vector = np.frombuffer(blob, dtype=np.float32)
                    for row in rows:  # a row at a time: a list index per blob cost 0.15 s per 10k rows
                        matrix[row] = vector
                        found[row] = True
        finally:
            db.execute("COMMIT")
        keep = np.flatnonzero(found)
        if len(keep) < len(files):  # close the gaps in place, a block at a time: keep[i] >= i loses no row
            for start in range(0, len(keep), 1024):
                block = keep[start : start + 1024]
                matrix[start : start + len(block)] = matrix[block]
        entries = [CatalogEntry(str(p), str(label), str(sha), int(size), int(mtime), True)
                   for p, label, sha, size, mtime in (files[i] for i in keep)]
        return entries, matrix[: len(keep)]

    # -- inbox journal -----------------------------------------------------------------------------------

    def journal_begin(self, entry: JournalEntry) -> None:
        self.journal_begin_many([entry])

    def journal_begin_many(self, entries: list[JournalEntry], backbone: str = "",
                           bottlenecks: Iterable[tuple[str, str, np.ndarray]] = ()) -> None:
        """Write journal entries in one transaction (an inbox batch: one commit, not one per file), with the
        batch's new (sha256, variant, vector) triples for `backbone` (`put_bottlenecks` in the same commit)."""
        now = time.time()
        rows = _bottleneck_rows(backbone, bottlenecks)
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO journal (id, source, destination, record, state, created, source_stat) "
                "VALUES (?,?,?,?,?,?,?)",
                [(e.id, e.source, e.destination, e.record, e.state, now, e.source_stat) for e in entries],
            )
            db.executemany(_PUT_BOTTLENECK, rows)

    def journal_finish(self, entry_id: str) -> None:
        self.journal_finish_many([entry_id])

    def journal_finish_many(self, entry_ids: list[str]) -> None:
        """Close journal entries in one transaction."""
        with self._tx() as db:
            db.executemany("DELETE FROM journal WHERE id = ?", [(i,) for i in entry_ids])

    def journal_open(self) -> list[JournalEntry]:
        rows = self._db().execute(
            "SELECT id, source, destination, record, state, source_stat FROM journal").fetchall()
        return [JournalEntry(*r) for r in rows]

    # -- review actions ----------------------------------------------------------------------------------

    def review_begin(self, kind: str, plan: str) -> int:
        """Journal a reviewer's action before its files move; returns its sequence number."""
        with self._tx() as db:
            cursor = db.execute("INSERT INTO review_actions (kind, plan, state, created) VALUES (?,?,?,?)",
                                (kind, plan, "doing", time.time()))
            return int(cursor.lastrowid or 0)

    def review_set_state(self, seq: int, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE review_actions SET state = ? WHERE seq = ?", (state, seq))

    def review_actions(self, states: tuple[str, ...]) -> list[ReviewActionRow]:
        """Actions in any of `states`, newest first."""
        marks = ",".join("?" * len(states))
        rows = self._db().execute(f"SELECT seq, kind, plan, state FROM review_actions WHERE state IN ({marks}) "
                                  "ORDER BY seq DESC", states).fetchall()
        return [ReviewActionRow(*r) for r in rows]

_PUT_BOTTLENECK = "INSERT OR REPLACE INTO bottlenecks VALUES (?,?,?,?,?,?)"
_UPSERT_FILE = f"INSERT OR REPLACE INTO files ({_FILE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"


def _file_rows(entries: Iterable[CatalogEntry]) -> list[tuple[object, ...]]:
    return [(e.path, e.label, e.sha256, e.size, e.mtime_ns, int(e.ok), e.ctime_ns, e.inode) for e in entries]


def _bottleneck_rows(backbone: str, items: Iterable[tuple[str, str, np.ndarray]]) -> list[tuple[object, ...]]:
    """Rows of the bottlenecks table for (sha256, variant, vector) triples: float32 bytes with their CRC32."""
    now = time.time()
    rows: list[tuple[object, ...]] = []
    for sha, variant, vector in items:
        blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        rows.append((sha, backbone, variant, blob, zlib.crc32(blob), now))
    return rows


def _entry(row: tuple[object, ...]) -> CatalogEntry:
    path, label, sha, size, mtime, ok, ctime, inode = row
    return CatalogEntry(str(path), str(label), None if sha is None else str(sha), int(str(size)), int(str(mtime)),
                        bool(ok), int(str(ctime)), int(str(inode)))
