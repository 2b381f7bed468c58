"""What `relocd migrate` shows while the daemon migrates, and the summary after.

The daemon sends progress events over the control socket with these fields
(all optional, unknown ones ignored):

``phase`` (reserve, precopy, stop-and-copy, prepare, ...), ``round``,
``pages_left`` (pages dirty, still to send), ``dirty_rate`` (bytes/s the guest
dirties), ``bandwidth`` (bytes/s on the wire), ``expected_downtime_ms``,
``bytes_sent``.

On a terminal one line is redrawn in place; otherwise (a pipe, a log, CI) a
plain line is printed at most once per interval and on every phase change.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from relocd.units import format_bytes, format_rate


def _number(event: Mapping[str, Any], key: str) -> float | None:
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def describe(event: Mapping[str, Any]) -> str:
    """One line describing a progress event, e.g. ``round 3: 1,204 pages dirty, ...``."""
    parts: list[str] = []
    rnd = _number(event, "round")
    head = f"round {int(rnd)}" if rnd is not None else ""
    phase = event.get("phase")
    if isinstance(phase, str) and phase:
        head = f"{head} [{phase}]" if head else f"[{phase}]"
    pages_left = _number(event, "pages_left")
    if pages_left is not None:
        parts.append(f"{int(pages_left):,} pages dirty")
    dirty_rate = _number(event, "dirty_rate")
    if dirty_rate is not None:
        parts.append(f"dirtying {format_rate(dirty_rate)}")
    bandwidth = _number(event, "bandwidth")
    if bandwidth is not None:
        parts.append(f"sending {format_rate(bandwidth)}")
    bytes_sent = _number(event, "bytes_sent")
    if bytes_sent is not None:
        parts.append(f"{format_bytes(bytes_sent)} sent")
    downtime = _number(event, "expected_downtime_ms")
    if downtime is not None:
        parts.append(f"expected downtime {downtime:,.1f} ms")
    body = ", ".join(parts)
    if head and body:
        return f"{head}: {body}"
    return head or body or "working"


class MigrationProgress:
    """Turns progress events into a live line (terminal) or periodic lines (pipe)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval_s = (0.1 if self.tty else 1.0) if interval_s is None else interval_s
        self._clock = clock
        self._last_shown: float | None = None
        self._last_phase: object = None
        self._pending: Mapping[str, Any] | None = None
        self._line_open = False

    def update(self, event: Mapping[str, Any]) -> None:
        """Take one event; draw it now if due (always on a phase change)."""
        now = self._clock()
        phase = event.get("phase")
        phase_changed = self._last_shown is not None and phase != self._last_phase
        if phase_changed and self._pending is not None and not self.tty:
            self._show(describe(self._pending))  # how the previous phase ended
        due = (
            self._last_shown is None
            or phase_changed
            or now - self._last_shown >= self.interval_s
        )
        self._last_phase = phase
        if not due:
            self._pending = event  # shown later, or by finish()
            return
        self._pending = None
        self._last_shown = now
        self._show(describe(event))

    def finish(self) -> None:
        """Show the last event not yet drawn and leave the cursor on a fresh line."""
        if self._pending is not None and not self.tty:
            self._show(describe(self._pending))
        self._pending = None
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.flush()

    def _show(self, line: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns
            if len(line) >= width:
                line = line[: max(width - 2, 10)] + "…"
            self.stream.write("\r" + line + "\x1b[K")
            self._line_open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _seconds(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms < 1000 else f"{ms / 1000:,.2f} s"


def summarize_migration(result: Mapping[str, Any], host: str) -> str:
    """One paragraph saying how a migration went, from its result object."""
    name = result.get("domain", "?")
    mode = "live" if result.get("live") else "non-live"
    status = result.get("status", "failed")
    total_ms = _number(result, "total_ms") or 0.0
    error = result.get("error")
    if status == "completed":
        rounds = int(_number(result, "iterations") or 0)
        pages = int(_number(result, "pages_sent") or 0)
        sent = _number(result, "bytes_sent") or 0.0
        downtime = _number(result, "downtime_ms") or 0.0
        text = (
            f"Migrated {name} to {host} ({mode}) in {_seconds(total_ms)}: "
            f"{rounds} round{'s' if rounds != 1 else ''}, {pages:,} pages sent "
            f"({format_bytes(sent)}), downtime {downtime:,.1f} ms"
        )
        verified = result.get("verified")
        if verified is True:
            text += ", memory verified"
        elif verified is False:
            text += ", memory verification FAILED"
        return text + "."
    outcome = "rolled back" if status == "rolled-back" else "failed"
    text = f"Migration of {name} to {host} ({mode}) {outcome} after {_seconds(total_ms)}"
    if error:
        text += f": {error}"
    if status == "rolled-back":
        text += f". {name} stays on this host"
    return text + "."
