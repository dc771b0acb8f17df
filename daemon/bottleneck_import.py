"""`retraind import`: bottlenecks made elsewhere (`retraind bulk embed`'s Parquet) into the store, by content hash.

A file is refused whole, in one line, when its vectors are not of the configured backbone's length or its rows
name another backbone: vectors of another network would poison every model trained on them. Rows are read a
batch at a time; a vector already stored (and passing its CRC) is skipped, so importing twice changes nothing;
every written vector is read back through the store's CRC check and compared before it counts as imported.
Which files are read at all (only those a finished run's manifest lists) is daemon/bulk_manifest.py's rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon.store import ORIGINAL, Store

_BATCH_ROWS = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class ImportReport:
    """Counts of rows; `refusals` holds one line per refused file or row group, for a person."""

    imported: int = 0
    skipped: int = 0
    refused: int = 0
    refusals: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"imported {self.imported}, skipped {self.skipped} (stored already or error rows), " \
               f"refused {self.refused}"


def row_count(files: Iterable[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


class BottleneckImporter:
    """Imports into `store` the vectors of `backbone` (its id) whose length is `dim`."""

    def __init__(self, store: Store, backbone: str, dim: int,
                 on_rows: Callable[[int], object] = lambda rows: None) -> None:
        self._store, self._backbone, self._dim = store, backbone, dim
        self._on_rows = on_rows  # progress: called with each batch's (or refused file's) row count

    def run(self, files: Iterable[Path]) -> ImportReport:
        report = ImportReport()
        for path in files:
            self._file(path, report)
        return report

    def _file(self, path: Path, report: ImportReport) -> None:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        rows = parquet.metadata.num_rows
        problem = self._schema_problem(parquet.schema_arrow)
        if problem is not None:
            report.refused += rows
            report.refusals.append(f"{path}: {problem}; refused {rows} rows")
            self._on_rows(rows)
            return
        for batch in parquet.iter_batches(_BATCH_ROWS, columns=["sha256", "backbone", "vector", "error"]):
            self._batch(path, batch, report)
            self._on_rows(batch.num_rows)

    def _schema_problem(self, schema: Any) -> str | None:
        import pyarrow as pa

        missing = [name for name in ("sha256", "backbone", "vector", "error") if name not in schema.names]
        if missing:
            return f"not a `retraind bulk embed` file (no column {', '.join(missing)})"
        kind = schema.field("vector").type
        if not pa.types.is_fixed_size_list(kind) or kind.value_type != pa.float32():
            return f"column vector is {kind}, not a fixed-size list of float32"
        if kind.list_size != self._dim:
            return (f"vectors of {kind.list_size} floats, but the configured backbone {self._backbone} makes "
                    f"{self._dim}")
        return None

    def _batch(self, path: Path, batch: Any, report: ImportReport) -> None:
        columns = {name: batch.column(name).to_pylist() for name in ("sha256", "backbone", "error")}
        other = {b for b, error in zip(columns["backbone"], columns["error"]) if error is None and b != self._backbone}
        if other:
            report.refused += len(columns["backbone"])
            report.refusals.append(f"{path}: rows of backbone {', '.join(sorted(other))}, but the configured "
                                   f"backbone is {self._backbone}; refused {len(columns['backbone'])} rows")
            return
        column = batch.column("vector")
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        matrix = np.zeros((len(valid), self._dim), np.float32)
        matrix[valid] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, self._dim)  # nulls: no values
        usable: dict[str, np.ndarray] = {}
        for sha, error, has_vector, vector in zip(columns["sha256"], columns["error"], valid, matrix):
            if error is not None or not has_vector:
                report.skipped += 1
            elif not (isinstance(sha, str) and _SHA256.fullmatch(sha)) or not np.isfinite(vector).all():
                report.refused += 1
                report.refusals.append(f"{path}: a row with a bad sha256 ({sha!r}) or non-finite values; refused")
            else:
                usable[sha] = vector
        self._store_new(path, usable, report)

    def _store_new(self, path: Path, vectors: dict[str, np.ndarray], report: ImportReport) -> None:
        stored = self._store.get_bottlenecks(self._backbone, vectors)  # CRC-checked: a damaged one is replaced
        report.skipped += len(stored)
        new = {sha: vector for sha, vector in vectors.items() if sha not in stored}
        self._store.put_bottlenecks(self._backbone, ((sha, ORIGINAL, v) for sha, v in new.items()))
        back = self._store.get_bottlenecks(self._backbone, new)
        for sha, vector in new.items():
            if sha in back and np.array_equal(back[sha], vector):
                report.imported += 1
            else:
                report.refused += 1
                report.refusals.append(f"{path}: {sha} did not read back intact from the store; refused")
