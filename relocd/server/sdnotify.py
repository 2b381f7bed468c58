"""sd_notify(3) without libsystemd: tell systemd we are ready, stopping, alive.

systemd passes a datagram socket in ``$NOTIFY_SOCKET`` to Type=notify
services; a leading ``@`` names a socket in the abstract namespace.  When the
variable is unset (run by hand, under tests) every call is a no-op.  Nothing
here ever raises: a daemon must not die because its supervisor went away.

The watchdog (``WatchdogSec=``) is fed from the event loop itself
(:func:`keep_informed`): a loop stuck in a blocking call (a hung libxenctrl
call, a xenstored that never answers) runs no task, sends no ``WATCHDOG=1``,
and systemd restarts the daemon.  A thread would keep pinging for a daemon
that no longer does anything.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import structlog

log = structlog.get_logger(__name__)


def _address(raw: str) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # vsock:... and friends are not for us


def format_fields(fields: dict[str, Any]) -> bytes:
    """``ready=True, status="x"`` -> ``b"READY=1\\nSTATUS=x"`` (keys upper-cased)."""
    lines = []
    for key, value in fields.items():
        if value is None or value is False:
            continue
        text = "1" if value is True else str(value)
        lines.append(f"{key.upper()}={' '.join(text.splitlines())}")
    return "\n".join(lines).encode()


class SdNotifier:
    """One connection to systemd's notify socket (or none, quietly)."""

    def __init__(self, notify_socket: str | None = None) -> None:
        raw = os.environ.get("NOTIFY_SOCKET", "") if notify_socket is None else notify_socket
        self._address = _address(raw)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: Any) -> bool:
        """Send one state update; True when it reached the socket."""
        payload = format_fields(fields)
        if self._address is None or not payload:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._address)
            return True
        except OSError as exc:
            log.debug("sd_notify failed", error=str(exc))
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify(ready=True, status=status, mainpid=os.getpid())

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(stopping=True, status=status)

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def watchdog(self) -> bool:
        return self.notify(watchdog=True)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def reloading_fields() -> dict[str, Any]:
    """RELOADING=1 with the MONOTONIC_USEC systemd 253+ asks for (READY=1 ends it)."""
    return {"RELOADING": 1, "MONOTONIC_USEC": time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1 (half of WatchdogSec), or None if not asked."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2_000_000


_default: SdNotifier | None = None


def notify(**fields: Any) -> bool:
    """Module-level shorthand: ``notify(ready=True, status="listening on :8002")``."""
    global _default
    if _default is None:
        _default = SdNotifier()
    return _default.notify(**fields)


class Activity(NamedTuple):
    """What ``STATUS=`` reports: domains here, migrations in flight each way."""

    domains: int
    outgoing: int
    incoming: int


class ServiceStatus:
    """``STATUS=`` for ``systemctl status``, e.g. ``serving; 3 domains; 1 outgoing, 0 incoming migrations``.

    ``observe`` is a Host observer: each migration that starts or ends sends
    the line at once; :func:`keep_informed` refreshes it (domains created or
    destroyed).  A line is sent only when it changed.
    """

    def __init__(self, notifier: SdNotifier, activity: Callable[[], Activity]) -> None:
        self.notifier = notifier
        self.activity = activity
        #: "serving", then "shutting down"
        self.phase = "serving"
        self._sent: str | None = None

    def text(self) -> str:
        a = self.activity()
        domains = f"{a.domains} domain{'' if a.domains == 1 else 's'}"
        return f"{self.phase}; {domains}; {a.outgoing} outgoing, {a.incoming} incoming migrations"

    def update(self, **fields: Any) -> bool:
        """Send the line if it changed, or if other fields (READY=1, STOPPING=1) go with it."""
        try:
            line = self.text()
        except Exception:  # a daemon half started or half stopped: say nothing
            log.debug("status line unavailable", exc_info=True)
            return False
        if line == self._sent and not fields:
            return False
        self._sent = line
        return self.notifier.notify(**fields, STATUS=line)

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        if event in ("migration_started", "migration_finished"):
            self.update()


#: How often the status line is looked at when no watchdog asks for more.
STATUS_REFRESH_S = 5.0


async def keep_informed(
    notifier: SdNotifier, status: ServiceStatus | None, watchdog_s: float | None
) -> None:
    """Feed the watchdog every ``watchdog_s`` (half of WatchdogSec) and refresh ``status``.

    Runs as a task on the daemon's loop until cancelled, the last thing the
    shutdown does: a long drain is still a live daemon.
    """
    period = STATUS_REFRESH_S if watchdog_s is None else min(watchdog_s, STATUS_REFRESH_S)
    while True:
        if watchdog_s is not None:
            notifier.watchdog()
        if status is not None:
            status.update()
        await asyncio.sleep(period)
