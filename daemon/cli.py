"""`retraind` command line: parses the arguments and dispatches; the running service is `daemon/service.py`.
User mistakes (config, missing weights) print one line and exit 78 (EX_CONFIG); no
model yet exits 1, no daemon answering (status excepted, which falls back to the state dir) exits 69, a
second `run` on a data root another daemon holds exits 75 (EX_TEMPFAIL)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from daemon import __version__
from daemon.backbone import BackboneUnavailable
from daemon.bulk_cli import EX_DATAERR, add_commands
from daemon.bulk_sources import SourceError
from daemon.config import EX_CONFIG, Config, ConfigError, load_config
from daemon.export import ExportError
from daemon.instance_lock import EX_TEMPFAIL, AlreadyRunning
from daemon.logs import foreign_output_as_debug, quiet_tensorflow
from daemon.oneshot import NoModel
from daemon.registry import ModelUnreadable
from daemon.status import DaemonUnavailable

EX_UNAVAILABLE = 69
EX_CANTCREAT = 73  # sysexits.h: an output file cannot be created


class CannotWrite(Exception):
    """An output path (`--out` of `report`, `export`) where nothing can be written."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"cannot write {path}: {exc.strerror or exc}")


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("RETRAIND_CONFIG", "config.yaml"))


def _config(args: argparse.Namespace) -> Config:
    config = load_config(_config_path(args))
    quiet_tensorflow(debug=config.log_level == "DEBUG")  # before anything imports TensorFlow
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.service import Service

    return Service(_config_path(args), args.plugins).run()


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the file, make the folders and read the token file as `run` does, then build the backbone: a
    misspelt `backbone.name` or missing weights fail here."""
    from daemon.app import make_folders
    from daemon.engines import build_backbone
    from daemon.http.security import read_token
    from daemon.plugin_manager import Hooks

    config = _config(args)
    make_folders(config)
    read_token(config.http)
    backbone = build_backbone(Hooks.of(config, args.plugins), config)
    print(f"config OK: data in {config.data_root}, backbone {backbone.id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.status import format_status, gather

    status = gather(_config(args))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0 if status["model"] else 1


def cmd_retrain(args: argparse.Namespace) -> int:
    from daemon.http import MODEL_NAME
    from daemon.status import request

    code, body = request(_config(args), f"/v1/models/{MODEL_NAME}:retrain", "POST")
    if code == 200:
        answer = json.loads(body)
        print(f"training set unchanged since model {answer['model_version']} was trained: nothing new to publish")
    else:
        print("retrain requested; the current model serves until a better one is published" if code == 202
              else f"retraind: the daemon refused ({code}): {body.decode(errors='replace')}")
    return 0 if code in (200, 202) else 1


def cmd_classify(args: argparse.Namespace) -> int:
    """One-shot top-k for files, like the seed's run_inference_on_image, with the published model."""
    from daemon.images import ImageRejected
    from daemon.oneshot import classify_files, load_published

    config = _config(args)
    model = load_published(config, args.plugins)
    files = tqdm([Path(f) for f in args.files], desc="classifying", unit="img", disable=None, leave=False)
    rejected = 0
    for path, top in classify_files(config, model, files):
        if isinstance(top, ImageRejected):
            rejected += 1
            tqdm.write(f"{path}: rejected ({top.reason}): {top}", file=sys.stdout)
        else:
            tqdm.write(f"{path}:" + "".join(f"\n  {label} (score = {score:.5f})" for label, score in top),
                       file=sys.stdout)
    return 1 if rejected else 0


def cmd_export(args: argparse.Namespace) -> int:
    from daemon.export import STEPS, export_model
    from daemon.http import MODEL_NAME
    from daemon.oneshot import load_published

    model = load_published(_config(args), args.plugins, engine="keras")
    with foreign_output_as_debug() as stderr, tqdm(
            total=len(STEPS), desc=f"exporting model {model.version.number}", unit="step", disable=None,
            leave=False, file=stderr) as bar:
        try:
            done = export_model(model.version, model.backbone, Path(args.out), MODEL_NAME,
                                on_step=lambda step: (bar.set_postfix_str(step), bar.update()))
        except OSError as exc:
            raise CannotWrite(Path(args.out), exc) from exc
    print(f"exported model {model.version.number} ({len(model.version.labels)} labels, {model.backbone.id})\n"
          f"  SavedModel for TF Serving / Triton: {done.saved_model}\n"
          f"  TFLite: {done.tflite} (labels: {done.labels})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from daemon.registry import ModelRegistry
    from daemon.report import write_report

    config = _config(args)
    version = ModelRegistry.of(config).current()
    if version is None:
        raise NoModel("no model yet: nothing to report")
    out = Path(args.out) if args.out else config.data_root / "report.html"
    try:
        write_report(version, config.folder("classes"), out)
    except OSError as exc:
        raise CannotWrite(out, exc) from exc
    print(f"wrote {out.resolve()} (model {version.number})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retraind", description=__doc__)
    parser.add_argument("--config", help="config file (default: $RETRAIND_CONFIG or ./config.yaml)")
    parser.add_argument("--version", action="version", version=f"retraind {__version__}")
    # `--config` also after the command (`retraind run --config ...`); SUPPRESS keeps a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])
    add("run", help="run the daemon").set_defaults(func=cmd_run)
    add("check-config", help="validate the config (and that its backbone loads) and exit").set_defaults(
        func=cmd_check_config)
    status = add("status", help="model version, accuracy, images, inbox queue, last training")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)
    add("retrain", help="ask the running daemon to retrain now").set_defaults(func=cmd_retrain)
    classify = add("classify", help="print top-k labels for image files (no daemon needed)")
    classify.add_argument("files", nargs="+")
    classify.set_defaults(func=cmd_classify)
    export = add("export", help="write the model as a TF Serving SavedModel and a TFLite file")
    export.add_argument("--out", default="export", help="base folder (default: ./export)")
    export.set_defaults(func=cmd_export)
    report = add("report", help="write an HTML page about the current model")
    report.add_argument("--out", help="HTML file to write (default: report.html in the data root)")
    report.set_defaults(func=cmd_report)
    add_commands(add, common, _with_config)
    return parser


def _with_config(command: Callable[[argparse.Namespace, Config], int]) -> Callable[[argparse.Namespace], int]:
    return lambda args: command(args, _config(args))


def main(argv: list[str] | None = None, plugins: Sequence[object] = ()) -> int:
    """Entry point; `plugins` are registered after the built-in and installed ones (embedding, tests)."""
    args = build_parser().parse_args(argv)
    args.plugins = tuple(plugins)
    try:
        return int(args.func(args))
    except (ConfigError, BackboneUnavailable) as exc:
        print(f"retraind: {exc}", file=sys.stderr)
        return EX_CONFIG
    except AlreadyRunning as exc:
        print(f"retraind: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except (NoModel, ExportError) as exc:
        print(f"retraind: {exc}", file=sys.stderr)
        return 1
    except ModelUnreadable as exc:
        print(f"retraind: the published model {exc}", file=sys.stderr)
        return 1
    except CannotWrite as exc:
        print(f"retraind: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    except DaemonUnavailable as exc:
        print(f"retraind: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except SourceError as exc:
        print(f"retraind: {exc}", file=sys.stderr)
        return EX_DATAERR
    except BrokenPipeError:  # `retraind status | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
