"""The scale-out commands: `retraind bulk embed|classify SRC... --out DIR` (Ray Data, imported only here) and
`retraind import DIR...` (Parquet bottlenecks into the store)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from daemon.bulk_sources import SourceError
from daemon.config import Config
from daemon.store import STORE_FILE

#: Exit status of `import` when rows were refused, and of `bulk` when a SRC cannot be listed
EX_DATAERR = 65


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SourceError(f"this command needs {module}, which is not installed: pip install 'retraind[bulk]'")


def _summary(what: str, run: Any, out: str) -> str:
    errors = ", ".join(f"{n} {reason}" for reason, n in sorted(run.errors.items())) or "none"
    rate = run.files / run.seconds if run.seconds else 0.0
    ray = f", Ray's start {run.ray.start:.1f} s and stop {run.ray.stop:.1f} s included" if run.ray.start else ""
    return (f"{what} {run.files} files in {run.seconds:.1f} s ({rate:.1f} files/s, {run.workers} workers{ray}); "
            f"errors: {errors}; wrote {out}")


def cmd_bulk_embed(args: argparse.Namespace, config: Config) -> int:
    _require("ray")
    from daemon.bulk import embed

    run = embed(config, args.plugins, args.sources, args.out, args.address, args.workers, args.cpus_per_worker)
    print(_summary("embedded", run, args.out))
    return 0


def cmd_bulk_classify(args: argparse.Namespace, config: Config) -> int:
    _require("ray")
    from daemon.bulk import RESULTS_FILE, classify
    from daemon.oneshot import load_published

    model = load_published(config, args.plugins)
    print(f"classifying with model {model.version.number} ({model.version.backbone})", file=sys.stderr)
    run = classify(config, args.plugins, model.version, args.sources, args.out, args.address, args.workers,
                   args.cpus_per_worker)
    print(_summary("classified", run, f"{args.out.rstrip('/')}/{RESULTS_FILE}"))
    return 0


def cmd_import(args: argparse.Namespace, config: Config) -> int:
    _require("pyarrow")
    from daemon.bottleneck_import import BottleneckImporter, row_count
    from daemon.bulk_manifest import plan
    from daemon.engines import build_backbone
    from daemon.plugin_manager import Hooks
    from daemon.store import Store

    backbone = build_backbone(Hooks.of(config, args.plugins), config)
    found = plan(Path(d) for d in args.dirs)
    for line in found.ignored:
        print(f"retraind: {line}", file=sys.stderr)
    files = found.files
    store = Store(config.folder("state") / STORE_FILE)
    try:
        with tqdm(total=row_count(files), desc="importing bottlenecks", unit="row", disable=None,
                  leave=False) as bar:
            report = BottleneckImporter(store, backbone.id, backbone.dim, bar.update).run(files)
    finally:
        store.close()
    for line in found.refused + report.refusals:
        print(f"retraind: {line}", file=sys.stderr)
    print(f"{len(files)} Parquet files: {report.summary()}")
    return EX_DATAERR if report.refused or found.refused else 0


def _bulk_flags(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("sources", nargs="+", metavar="SRC",
                        help="folders, files or URIs (s3://, gs://, hdfs://, file://); a file's label is its top "
                             "folder below SRC")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on (e.g. ray://head:10001, or auto); default: this machine")
    parser.add_argument("--workers", type=int, default=None, help="actors (default: every CPU / cpus-per-worker)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs and engine threads per actor")


def add_commands(add: Callable[..., argparse.ArgumentParser], common: argparse.ArgumentParser,
                 wrap: Callable[[Callable[[argparse.Namespace, Config], int]], Callable[..., int]]) -> None:
    """Register `bulk` and `import` on the `retraind` parser (`add` makes a sub-command, `common` holds the
    flags every command takes, `wrap` gives a command its loaded config)."""
    bulk = add("bulk", help="embed or classify an archive of images on Ray (this machine or a cluster)")
    verbs = bulk.add_subparsers(dest="verb", required=True)
    embed = verbs.add_parser("embed", parents=[common], help="bottlenecks of every file as Parquet (sha256, backbone, vector, path, "
                                           "label, error)")
    _bulk_flags(embed, "folder or URI for the Parquet files")
    embed.set_defaults(func=wrap(cmd_bulk_embed))
    classify = verbs.add_parser("classify", parents=[common], help="the current model's top-k per file, files left in place")
    _bulk_flags(classify, "folder or URI for results.jsonl")
    classify.set_defaults(func=wrap(cmd_bulk_classify))
    imports = add("import", help="load `bulk embed` Parquet into the bottleneck store (idempotent)")
    imports.add_argument("dirs", nargs="+", metavar="DIR",
                         help="`bulk embed` output folders (or folders holding several), or Parquet files of one; "
                              "only what a finished run's _retraind-bulk.json lists is read")
    imports.set_defaults(func=wrap(cmd_import))
