"""Typed wrapper around ``sdnotify`` for the systemd notify protocol (sd_notify(3)).

The daemon says *what* happened (ready, reloading, ...) instead of hand-writing protocol
strings, and every call is a silent no-op outside systemd (tests, a terminal, containers).
"""

from __future__ import annotations

import os
import time
from typing import Any

import sdnotify


class SystemdNotifier:
    """Sends state changes to systemd via ``$NOTIFY_SOCKET``; does nothing when it is unset."""

    def __init__(self) -> None:
        # Only build an sdnotify notifier when there is a socket: sdnotify opens a socket first
        # and leaks it (ResourceWarning) when NOTIFY_SOCKET is missing. Send errors are
        # swallowed by sdnotify on purpose: losing a status line must never crash the daemon.
        self._notifier: Any = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None

    @property
    def enabled(self) -> bool:
        """True when connected to a notify socket, i.e. messages actually go somewhere."""
        return self._notifier is not None and self._notifier.socket is not None

    def _send(self, *fields: str) -> None:
        # The protocol is newline-separated KEY=VALUE: flatten newlines so text can't forge a field.
        if self.enabled:
            self._notifier.notify("\n".join(" ".join(f.splitlines()) for f in fields))

    def ready(self, status: str) -> None:
        """Startup (or a reload) finished; Type=notify units count as started only now."""
        self._send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        """Free-form one-line status shown by ``systemctl status``."""
        self._send(f"STATUS={text}")

    def reloading(self) -> None:
        """A config reload began; send ``ready()`` when it is done.

        systemd >= 253 (Type=notify-reload) needs MONOTONIC_USEC, the CLOCK_MONOTONIC time of
        the message, to tell this reload apart from an earlier one; older versions ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> None:
        """Keep-alive ping; with WatchdogSec= set, systemd kills us if these stop arriving."""
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        """Shutdown began, so systemd shows 'deactivating' rather than a hang or crash."""
        self._send("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` pings, or None when no watchdog is expected of us.

        Same rules as sd_watchdog_enabled(3): WATCHDOG_USEC is the timeout, and a WATCHDOG_PID
        naming another process means the watchdog is not ours. Half the timeout is the
        recommended ping cadence, leaving slack for a slow or busy event loop.
        """
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and pid.strip() != str(os.getpid()):
            return None
        usec = os.environ.get("WATCHDOG_USEC", "").strip()
        return int(usec) / 2 / 1_000_000 if usec.isdecimal() and int(usec) > 0 else None

    def close(self) -> None:
        """Close the socket (idempotent); later calls become no-ops."""
        if self.enabled:
            self._notifier.socket.close()
        self._notifier = None
