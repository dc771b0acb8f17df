"""`retraind bulk embed|classify`: backfills on Ray Data, with the daemon's own backbone plugin, decoder plugins
and limits, so a vector made here is the one the daemon would have made (same backbone id, same numbers).

The driver lists the files (daemon/bulk_sources.py) and builds the backbone once (a missing weights file fails
here, in one line, and a TFLite conversion is made once and cached); an actor pool of `BulkWorker`s then
reads, hashes, decodes and embeds batches of `backbone.batch_size` files, one actor per `cpus_per_worker`
CPUs with that many engine threads. Ray is imported only by these commands: `ray.init()` on this machine, or
the cluster at `--address`. Every node needs retraind and its plugins installed; a node converts its own
TFLite engine on first use.

Embeddings are written by the workers as Parquet (`SCHEMA`); classifications are streamed back to the driver
and written as one `results.jsonl` in the daemon's record schema, renamed into place once complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from daemon.atomic import TMP_PREFIX
from daemon.backbone import preprocessing_of, served_as
from daemon.bulk_manifest import MANIFEST, Manifest
from daemon.bulk_sources import SourceError, SourceFile, SourceReader, list_sources, open_source
from daemon.config import ClassifyConfig, Config
from daemon.engines import build_backbone
from daemon.images import ImageRejected, decode_or_reject
from daemon.plugin_manager import Hooks
from daemon.registry import ModelVersion
from daemon.results import ClassificationResult
from daemon.trust import judge

log = logging.getLogger(__name__)

#: The Parquet columns of `bulk embed`, in order; `vector` is a fixed-size list of the backbone's `dim` floats
COLUMNS = ("sha256", "backbone", "vector", "path", "label", "error")
RESULTS_FILE = "results.jsonl"


def schema(dim: int) -> Any:
    """The Parquet schema of `bulk embed` for a backbone of `dim` floats; all but `backbone` may be null
    (`sha256` of a file that could not be read, `vector` of a rejected file, `label` outside a label folder,
    `error` of a good file)."""
    import pyarrow as pa

    return pa.schema([("sha256", pa.string()), ("backbone", pa.string(), False),
                      ("vector", pa.list_(pa.float32(), dim)), ("path", pa.string()), ("label", pa.string()),
                      ("error", pa.string())])


@dataclass
class Embedded:
    """One batch through a worker: per file its sha256 (None if unreadable) and error (None if embedded);
    `vectors` has a row per file, zeros where it has an error."""

    sha256: list[str | None] = field(default_factory=list)
    error: list[str | None] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))


class BulkWorker:
    """One per Ray actor: the daemon's plugins and backbone built once (engine threads: the actor's CPUs)."""

    def __init__(self, config: Config, plugins: Sequence[object], threads: int,
                 version: ModelVersion | None = None) -> None:
        self._config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, threads=threads))
        self._hooks = Hooks.of(config, plugins)
        self.backbone = build_backbone(self._hooks, self._config)
        if version is not None:  # classify: the model's own preprocessing, as the daemon serves it
            served = served_as(self.backbone, version.backbone, self._hooks.preprocessing_versions())
            if served is None:
                raise ValueError(f"model {version.number} ({version.backbone}) cannot run on {self.backbone.id}")
            self.backbone = served
        self._reader = SourceReader(config.watch.max_file_bytes)
        self._version = version

    def _pixels(self, root: str, path: str, shown: str, size: int) -> tuple[str | None, np.ndarray | str]:
        """(sha256, uint8 pixels) or (sha256 if it was read, "reason: message")."""
        sha: str | None = None
        try:
            data, sha = self._reader.read(root, path, shown, size)
            return sha, decode_or_reject(self._hooks.decode_image, data, self.backbone.input_size,
                                         self._config.watch.max_image_pixels, preprocessing_of(self.backbone.id))
        except ImageRejected as exc:
            return sha, f"{exc.reason}: {exc}"
        except Exception as exc:  # a decoder plugin's bug fails its file, not the backfill
            log.exception("%s: decoding failed", shown)
            return sha, f"failed: {type(exc).__name__}: {exc}"

    def embed(self, rows: dict[str, list[Any]]) -> Embedded:
        out = Embedded(vectors=np.zeros((len(rows["path"]), self.backbone.dim), np.float32))
        good: list[int] = []
        images: list[np.ndarray] = []
        for i, item in enumerate(zip(rows["root"], rows["path"], rows["shown"], rows["size"])):
            sha, pixels = self._pixels(*item)
            out.sha256.append(sha)
            out.error.append(pixels if isinstance(pixels, str) else None)
            if not isinstance(pixels, str):
                good.append(i)
                images.append(pixels)
        if images:
            out.vectors[good] = self.backbone.embed(np.stack(images))
        return out

    def __call__(self, batch: Any) -> Any:
        """A pyarrow batch of listed files (`SourceFile` columns) → `schema` rows, or (with a model) per file
        its `record` as a JSON string and its rejection `reason` (null when classified)."""
        rows = batch.to_pydict()
        done = self.embed(rows)
        if self._version is not None:
            return _records_table(self._version, rows, done, self._config.classify)
        import pyarrow as pa

        dim = self.backbone.dim
        ok = np.array([e is None for e in done.error])
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(done.vectors.reshape(-1)), dim, mask=pa.array(~ok))
        columns = [done.sha256, [self.backbone.id] * len(ok), vectors, rows["shown"], rows["label"], done.error]
        return pa.Table.from_arrays([pa.array(c) if isinstance(c, list) else c for c in columns],
                                    schema=schema(dim))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _records_table(version: ModelVersion, rows: dict[str, list[Any]], done: Embedded, classify: ClassifyConfig) -> Any:
    """The daemon's `results.jsonl` record per classified file (no destination: files stay where they are,
    `path` says where), judged as the daemon judges an inbox file (`trust.judge`: the calibrated top-k, the
    novelty score, and `review_reason` where the daemon would send it to review), and the daemon's rejection
    record (`file`, `reason`, `error`, `time`) per bad one."""
    import pyarrow as pa

    ok = [i for i, error in enumerate(done.error) if error is None]
    judged = dict(zip(ok, judge(version, done.vectors[ok], classify))) if ok else {}
    records, reasons = [], []
    for i, (shown, sha, error) in enumerate(zip(rows["shown"], done.sha256, done.error)):
        if error is None:
            result = ClassificationResult(
                id=uuid.uuid4().hex, source=Path(shown), sha256=str(sha), top_k=judged[i].top_k,
                model_version=version.number, backbone=version.backbone, time=_now(),
                review_reason=judged[i].review_reason, novelty=judged[i].novelty, extra={"path": shown})
            record = result.record()
        else:
            reason, _, message = error.partition(": ")
            record = {"file": Path(shown).name, "path": shown, "reason": reason, "error": message, "time": _now()}
        records.append(json.dumps(record, ensure_ascii=False))
        reasons.append(None if error is None else reason)
    return pa.table({"record": pa.array(records, pa.string()), "reason": pa.array(reasons, pa.string())})


@dataclass(frozen=True)
class BulkRun:
    """What a backfill did: files listed, how many failed (by reason), seconds, actors, and of those seconds
    the ones spent starting and stopping Ray."""

    files: int
    errors: dict[str, int]
    seconds: float
    workers: int
    ray: RayTimes


@dataclass
class RayTimes:
    """Seconds `ray_session` spent in `ray.init()` and `ray.shutdown()` (0 when it joined a Ray started already)."""

    start: float = 0.0
    stop: float = 0.0


@contextmanager
def ray_session(address: str | None, times: RayTimes) -> Iterator[Any]:
    """Ray, initialised here unless this process already did (a test module's one session): this machine's
    CPUs when `address` is None, else the cluster there ("auto" for the one this machine belongs to).

    No dashboard and no `runtime_env`: a runtime environment, even of environment variables alone, makes Ray
    start fresh worker processes for it instead of the ones it started with itself (about 2 s more per job on
    2 cores). A local Ray's workers inherit this process's environment (TensorFlow's log level included)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    began = time.perf_counter()
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    times.start = time.perf_counter() - began
    try:
        yield ray
    finally:
        began = time.perf_counter()
        ray.shutdown()
        times.stop = time.perf_counter() - began


def _dataset(ray: Any, config: Config, plugins: Sequence[object], files: list[SourceFile], workers: int | None,
             cpus_per_worker: int, version: ModelVersion | None) -> tuple[Any, int]:
    """The mapped dataset (lazy) and its number of actors (default: every CPU of the cluster, at least 1; never
    more than there are batches, as an actor without one would only add start-up).

    One input block per batch: Ray Data would otherwise cut the listing into blocks of its own size, and a
    batch straddling two blocks reaches a worker as two calls (one of them a batch of 1)."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = -(-len(files) // config.backbone.batch_size)
    size = min(blocks, workers or max(1, cpus // cpus_per_worker))
    items = ray.data.from_items([dataclasses.asdict(f) for f in files], override_num_blocks=blocks)
    mapped = items.map_batches(
        BulkWorker, fn_constructor_args=(config, tuple(plugins), cpus_per_worker, version),
        batch_size=config.backbone.batch_size, batch_format="pyarrow", num_cpus=cpus_per_worker,
        compute=ray.data.ActorPoolStrategy(size=size))
    return mapped, size


def _listed(config: Config, plugins: Sequence[object], sources: Sequence[str], area: str) -> list[SourceFile]:
    hooks = Hooks.of(config, plugins)
    files = list_sources(sources, lambda rel: hooks.accept_path(rel, area))
    if not files:
        raise SourceError(f"no files found under {', '.join(sources)}")
    return files


def embed(config: Config, plugins: Sequence[object], sources: Sequence[str], out: str, address: str | None = None,
          workers: int | None = None, cpus_per_worker: int = 1) -> BulkRun:
    """Bottlenecks of every file under `sources` as Parquet files in the folder or URI `out`, with the manifest
    that `retraind import` requires written last (daemon/bulk_manifest.py): the parts are written into a
    temporary folder inside `out` and moved in once the whole job has succeeded."""
    from pyarrow.fs import FileType

    backbone = build_backbone(Hooks.of(config, plugins), config)  # fails fast, converts once
    files = _listed(config, plugins, sources, "classes")
    system, root = open_source(out)
    if system.get_file_info(f"{root}/{MANIFEST}").type != FileType.NotFound:
        raise SourceError(f"{out}: holds a finished `bulk embed` output already ({MANIFEST}); give another --out")
    tmp = f"{root}/{TMP_PREFIX}{uuid.uuid4().hex}"
    started, times = time.perf_counter(), RayTimes()
    with ray_session(address, times) as ray:
        dataset, size = _dataset(ray, config, plugins, files, workers, cpus_per_worker, None)
        # on `out`'s own file system (`tmp` is a path inside it, no scheme); no CPU: a write must not wait for one
        dataset.write_parquet(tmp, filesystem=system, ray_remote_args={"num_cpus": 0})
    parts, errors = _parts(system, tmp)
    for name in parts:
        system.move(f"{tmp}/{name}", f"{root}/{name}")
    Manifest(backbone.id, backbone.dim, parts).write(system, root)
    system.delete_dir(tmp)
    return BulkRun(len(files), errors, time.perf_counter() - started, size, times)


def _parts(system: Any, folder: str) -> tuple[dict[str, int], dict[str, int]]:
    """The Parquet parts just written to `folder` with their rows, and the errors among them by reason (only
    the `error` column is read)."""
    import pyarrow.dataset as pads

    written = pads.dataset(folder, filesystem=system, format="parquet")
    parts = {Path(fragment.path).name: fragment.metadata.num_rows for fragment in written.get_fragments()}
    counts: dict[str, int] = {}
    for error in written.to_table(columns=["error"])["error"].drop_null().to_pylist():
        reason = error.split(":", 1)[0]
        counts[reason] = counts.get(reason, 0) + 1
    return parts, counts


def classify(config: Config, plugins: Sequence[object], version: ModelVersion, sources: Sequence[str], out: str,
             address: str | None = None, workers: int | None = None, cpus_per_worker: int = 1) -> BulkRun:
    """`version`'s top-k for every file under `sources` (left where they are), one record per file in
    `<out>/results.jsonl`."""
    files = _listed(config, plugins, sources, "inbox")
    system, root = open_source(out)
    system.create_dir(root, recursive=True)
    final, tmp = f"{root}/{RESULTS_FILE}", f"{root}/{TMP_PREFIX}{uuid.uuid4().hex}-{RESULTS_FILE}"
    started, times = time.perf_counter(), RayTimes()
    errors: dict[str, int] = {}
    with ray_session(address, times) as ray:
        dataset, size = _dataset(ray, config, plugins, files, workers, cpus_per_worker, version)
        with system.open_output_stream(tmp) as stream:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                for line, reason in zip(batch["record"].to_pylist(), batch["reason"].to_pylist()):
                    stream.write(line.encode("utf-8", "backslashreplace") + b"\n")
                    if reason is not None:
                        errors[reason] = errors.get(reason, 0) + 1
    system.move(tmp, final)
    return BulkRun(len(files), errors, time.perf_counter() - started, size, times)
