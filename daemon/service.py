"""The running service (`retraind run`): builds the daemon from the config, and while it runs answers signals
(SIGTERM/SIGINT stop, SIGHUP reloads the config, falling back to the running one when the new one cannot
start), feeds the systemd watchdog only while the pipeline worker goes round, keeps the STATUS line current,
and shows a progress bar on a terminal while many training images are cached."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from daemon.app import App, DaemonStatus
from daemon.backbone import BackboneUnavailable
from daemon.config import Config, ConfigError, load_config
from daemon.instance_lock import AlreadyRunning
from daemon.logs import setup_logging
from daemon.notify import SystemdNotifier
from daemon.status import files_waiting

log = logging.getLogger("retraind")

_BULK = 32  # files indexed in one go from which caching gets a progress bar and a STATUS line
#: A pipeline loop silent this long is hung (one batch of 256 images takes ~30 s on the slowest backbone
#: here): the watchdog goes unfed and systemd restarts the daemon.
_STALL_SECONDS = 120.0
#: The main loop wakes at least this often (watchdog pings, STATUS updates).
_TICK_SECONDS = 5.0


class Signals:
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


class ServiceProgress:
    """The pipeline's `Progress` as the service shows it: bulk caching of training images (the start-up scan,
    a folder dropped in) as a progress bar on a terminal and numbers for the STATUS line, and when the
    worker last went round, for the watchdog. Fed from the pipeline and caching threads."""

    def __init__(self) -> None:
        self.done = self.total = 0
        self._bar: tqdm[None] | None = None
        self._last_round = time.monotonic()

    def went_round(self) -> None:
        self._last_round = time.monotonic()

    def fresh(self) -> bool:
        """The worker went round lately: a hung one leaves the watchdog unfed, though its thread lives."""
        return time.monotonic() - self._last_round < _STALL_SECONDS

    def indexed(self, indexed: int, waiting: int) -> None:
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


def status_line(status: DaemonStatus, progress: ServiceProgress) -> str:
    """`serving model 3; caching bottlenecks 512/4000; 2 files waiting in the inbox`."""
    parts = [f"serving model {status.model_version}" if status.model_version is not None
             else f"no model yet: waiting for images in {status.classes}/<label>/ (two labels or more)"]
    parts += [text for text in (progress.text(),) if text]
    if status.inbox_waiting:
        parts.append(f"{files_waiting(status.inbox_waiting)} in the inbox")
    return "; ".join(parts)


class Service:
    """`retraind run`: one daemon after another (a reload builds a new one) until a stop signal."""

    def __init__(self, path: Path, plugins: Sequence[object] = ()) -> None:
        self._path, self._plugins = path, tuple(plugins)
        self._signals = Signals()
        self._notifier = SystemdNotifier()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status. A config error at start-up raises
        `ConfigError` (or `BackboneUnavailable`); one at a reload is logged and the running config kept."""
        config: Config | None = load_config(self._path)
        assert config is not None
        setup_logging(config.log_level)
        running: Config | None = None  # the config that served last: a reload that cannot start goes back to it
        with logging_redirect_tqdm():
            while config is not None:
                progress = ServiceProgress()
                try:
                    app = App(config, self._plugins, progress)
                except (ConfigError, BackboneUnavailable, AlreadyRunning) as exc:
                    if running is None:
                        raise
                    self._refuse_reload(f"going back to the running config: {exc}")
                    config = running
                    continue
                running = config
                with app:
                    config = self._serve(app, progress)
        self._notifier.close()
        log.info("retraind stopped")
        return 0

    def _refuse_reload(self, why: str) -> None:
        log.error("reload refused, %s", why)
        self._notifier.status(f"reload refused: {why}")

    def _serve(self, app: App, progress: ServiceProgress) -> Config | None:
        """The main loop of a started daemon: watchdog pings, STATUS updates, signals. Returns None to stop,
        or the config to reload with."""
        signals, notifier = self._signals, self._notifier
        interval = min(notifier.watchdog_interval() or _TICK_SECONDS, _TICK_SECONDS)
        status = status_line(app.status(), progress)
        notifier.ready(status)
        while True:
            signals.wake.wait(interval)
            signals.wake.clear()
            if app.alive() and progress.fresh():
                notifier.watchdog()
            if signals.stop:
                notifier.stopping()
                return None
            if signals.reload and (new := self._reloaded()) is not None:
                return new
            if (now := status_line(app.status(), progress)) != status:
                status = now
                notifier.status(status)

    def _reloaded(self) -> Config | None:
        """The config to reload with, or None (logged, and said in STATUS) when it is broken."""
        self._signals.reload = False
        try:
            new = load_config(self._path)
        except ConfigError as exc:
            self._refuse_reload(f"keeping the running config: {exc}")
            return None
        self._notifier.reloading()
        return new
