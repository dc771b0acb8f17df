"""`retraind` command line. User mistakes (config, missing weights) print one line and exit 78 (EX_CONFIG); no
model yet exits 1, no daemon answering (status excepted, which falls back to the state dir) exits 69, a
second `run` on a data root another daemon holds exits 75 (EX_TEMPFAIL)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from daemon.backbone import BackboneUnavailable
from daemon.config import EX_CONFIG, Config, ConfigError, load_config
from daemon.export import ExportError
from daemon.instance_lock import EX_TEMPFAIL, AlreadyRunning
from daemon.logs import setup_logging
from daemon.oneshot import NoModel
from daemon.status import DaemonUnavailable

if TYPE_CHECKING:
    from daemon.app import App
    from daemon.notify import SystemdNotifier

log = logging.getLogger("retraind")

EX_UNAVAILABLE = 69
_BULK = 32  # files indexed in one go from which caching gets a progress bar and a STATUS line
#: A pipeline loop silent this long is hung (one batch of 256 images takes ~30 s on the slowest backbone
#: here): the watchdog goes unfed and systemd restarts the daemon.
_STALL_SECONDS = 120.0


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("RETRAIND_CONFIG", "config.yaml"))


def _config(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


class _Signals:
    """SIGTERM/SIGINT ask for a stop, SIGHUP for a reload; the main loop acts on them."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop = False
        self.reload = False
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True
        self.wake.set()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload = True
        self.wake.set()


class _Caching:
    """Bulk caching of training images (the start-up scan, a folder dropped in): a progress bar on a terminal,
    numbers for the STATUS line. Fed from the pipeline thread with (just indexed, still to index)."""

    def __init__(self) -> None:
        self.done = self.total = 0
        self._bar: tqdm[None] | None = None

    def __call__(self, indexed: int, waiting: int) -> None:
        if self._bar is None and indexed + waiting < _BULK:
            return
        if self._bar is None:
            self._bar = tqdm(total=indexed + waiting, desc="caching bottlenecks", unit="img", disable=None,
                             leave=False)
        self.done += indexed
        self.total = max(self.total, self.done + waiting)  # files may arrive meanwhile
        self._bar.total = self.total
        self._bar.update(indexed)
        if not waiting:
            self._bar.close()
            self._bar, self.done, self.total = None, 0, 0

    def text(self) -> str | None:
        return f"caching bottlenecks {self.done}/{self.total}" if self.total else None


class _Heartbeat:
    """When the pipeline loop last went round: the watchdog is fed only while it does, so a hung worker gets
    the daemon restarted even though its thread is still alive."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def fresh(self, max_age: float) -> bool:
        return time.monotonic() - self.last < max_age


def _status_text(app: App, caching: _Caching) -> str:
    version = app.serving.version
    parts = [f"serving model {version.number}" if version else "no model yet"]
    parts += [text for text in (caching.text(),) if text]
    pending = int(app.metrics.registry.get_sample_value("retraind_inbox_pending_files") or 0)
    if pending:
        parts.append(f"{pending} inbox files waiting")
    return "; ".join(parts)


def _watch(app: App, notifier: SystemdNotifier, signals: _Signals, path: Path) -> Config | None:
    """Run `app` with the main loop: watchdog pings, STATUS updates, signals. Returns None to stop, or the
    config to reload with."""
    caching, heartbeat = _Caching(), _Heartbeat()
    app.pipeline.on_indexed, app.pipeline.on_loop = caching, heartbeat.beat  # before start: the scan is due
    with app:
        return _loop(app, caching, heartbeat, notifier, signals, path)


def _loop(app: App, caching: _Caching, heartbeat: _Heartbeat, notifier: SystemdNotifier, signals: _Signals,
          path: Path) -> Config | None:
    interval = notifier.watchdog_interval() or 5.0
    status = _status_text(app, caching)
    notifier.ready(status)
    while True:
        signals.wake.wait(min(interval, 5.0))
        signals.wake.clear()
        if app.alive() and heartbeat.fresh(_STALL_SECONDS):
            notifier.watchdog()
        if signals.stop:
            notifier.stopping()
            return None
        if signals.reload:
            signals.reload = False
            try:
                new = load_config(path)
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", exc)
                notifier.status(f"reload refused: {exc}")
                continue
            notifier.reloading()
            return new
        if (now := _status_text(app, caching)) != status:
            status = now
            notifier.status(status)


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.app import App
    from daemon.notify import SystemdNotifier

    path = _config_path(args)
    config = load_config(path)
    setup_logging(config.log_level)
    signals = _Signals()
    notifier = SystemdNotifier()
    current: Config | None = config
    running: Config | None = None  # the config that served last: a reload that cannot start goes back to it
    with logging_redirect_tqdm():
        while current is not None:
            try:
                app = App(current, args.plugins)
            except (ConfigError, BackboneUnavailable, AlreadyRunning) as exc:
                if running is None:
                    raise
                log.error("reload refused, going back to the running config: %s", exc)
                notifier.status(f"reload refused: {exc}")
                current = running
                continue
            running, current = current, _watch(app, notifier, signals, path)
    notifier.close()
    log.info("retraind stopped")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the file, then build its backbone: a misspelt `backbone.name` or missing weights fail here."""
    from daemon.app import build_backbone
    from daemon.plugin_manager import Hooks, make_plugin_manager

    config = _config(args)
    backbone = build_backbone(Hooks(make_plugin_manager(config.plugins.disable, args.plugins)), config)
    print(f"config OK: data in {config.data_root}, backbone {backbone.id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.status import format_status, gather

    status = gather(_config(args))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0 if status["model"] else 1


def cmd_retrain(args: argparse.Namespace) -> int:
    from daemon.http_api import MODEL_NAME
    from daemon.status import request

    code, body = request(_config(args), f"/v1/models/{MODEL_NAME}:retrain", "POST")
    print("retrain requested; the current model serves until a better one is published" if code == 202
          else f"retraind: the daemon refused ({code}): {body.decode(errors='replace')}")
    return 0 if code == 202 else 1


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
    from daemon.http_api import MODEL_NAME
    from daemon.keras_engine import KerasBackbone
    from daemon.oneshot import load_published

    model = load_published(_config(args), args.plugins, engine="keras")
    if not isinstance(model.backbone, KerasBackbone):
        raise ConfigError(f"backbone.name: export needs a Keras network; the plugin for {model.backbone.id} "
                          "built another kind")
    with tqdm(total=len(STEPS), desc=f"exporting model {model.version.number}", unit="step", disable=None,
              leave=False) as bar:
        done = export_model(model.version, model.backbone, Path(args.out), MODEL_NAME,
                            on_step=lambda step: (bar.set_postfix_str(step), bar.update()))
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
    write_report(version, config.folder("classes"), Path(args.out))
    print(f"wrote {args.out} (model {version.number})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retraind", description=__doc__)
    parser.add_argument("--config", help="config file (default: $RETRAIND_CONFIG or ./config.yaml)")
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
    report.add_argument("--out", default="report.html", help="HTML file to write (default: ./report.html)")
    report.set_defaults(func=cmd_report)
    return parser


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
    except DaemonUnavailable as exc:
        print(f"retraind: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except BrokenPipeError:  # `retraind status | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
