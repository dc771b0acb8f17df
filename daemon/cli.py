"""`retraind` command line. User mistakes (config, missing weights) print one line and exit 78 (EX_CONFIG)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from daemon.backbone import BackboneUnavailable
from daemon.config import EX_CONFIG, Config, ConfigError, load_config
from daemon.logs import setup_logging

log = logging.getLogger("retraind")


def _config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("RETRAIND_CONFIG", "config.yaml"))


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


def _serve(config: Config, path: Path, signals: _Signals) -> Config | None:
    """Run one App until a stop (returns None) or a valid reload (returns the new config)."""
    from daemon.app import App
    from daemon.notify import SystemdNotifier

    notifier = SystemdNotifier()
    interval = notifier.watchdog_interval() or 5.0
    with App(config) as app:
        version = app.serving.version
        notifier.ready(f"serving model {version.number}" if version else "waiting for training data")
        while True:
            signals.wake.wait(min(interval, 5.0))
            signals.wake.clear()
            if app.alive():
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
                    continue
                notifier.reloading()
                return new


def cmd_run(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    config = load_config(path)
    setup_logging(config.log_level)
    signals = _Signals()
    current: Config | None = config
    while current is not None:
        current = _serve(current, path, signals)
    log.info("retraind stopped")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args.config))
    print(f"config OK: data in {config.data_root}, backbone {config.backbone.name}")
    return 0


def _api(config: Config, path: str, method: str = "GET") -> Any:
    url = f"http://{config.http.host}:{config.http.port}{path}"
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
        return json.loads(response.read())


def cmd_status(args: argparse.Namespace) -> int:
    """From the running daemon's API if it answers, else from the state dir."""
    from daemon.registry import ModelRegistry

    config = load_config(_config_path(args.config))
    try:
        info = _api(config, "/v1/models/retraind/metadata")
        source = "daemon"
    except (urllib.error.URLError, OSError):
        version = ModelRegistry(config.folder("state") / "models", config.training.keep_versions).current()
        info = {"model_spec": {"version": version.number}, **version.metrics} if version else None
        source = "state dir"
    if info is None:
        print("no model yet")
        return 1
    print(json.dumps({"source": source, **info}, indent=2))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args.config))
    print(json.dumps(_api(config, "/v1/models/retraind:retrain", "POST")))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """One-shot top-k for files, like the seed's run_inference_on_image, with the published model."""
    from daemon.oneshot import classify_files

    config = load_config(_config_path(args.config))
    for line in classify_files(config, [Path(f) for f in args.files]):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retraind", description=__doc__)
    parser.add_argument("--config", help="config file (default: $RETRAIND_CONFIG or ./config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon").set_defaults(func=cmd_run)
    sub.add_parser("check-config", help="validate the config and exit").set_defaults(func=cmd_check_config)
    sub.add_parser("status", help="model version, accuracy, images").set_defaults(func=cmd_status)
    sub.add_parser("retrain", help="ask the running daemon to retrain now").set_defaults(func=cmd_retrain)
    classify = sub.add_parser("classify", help="print top-k labels for image files")
    classify.add_argument("files", nargs="+")
    classify.set_defaults(func=cmd_classify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, BackboneUnavailable) as exc:
        print(f"retraind: {exc}", file=sys.stderr)
        return EX_CONFIG


if __name__ == "__main__":
    sys.exit(main())
