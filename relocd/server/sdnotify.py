"""sd_notify(3) without libsystemd: tell systemd we are ready, stopping, alive.

systemd passes a datagram socket in ``$NOTIFY_SOCKET`` to Type=notify
services; a leading ``@`` names a socket in the abstract namespace.  When the
variable is unset (run by hand, under tests) every call is a no-op.  Nothing
here ever raises: a daemon must not die because its supervisor went away.
"""

from __future__ import annotations

import os
import socket
from typing import Any

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
