"""What `relocd migrate` (and `job`, `evacuate`) show while the daemon migrates, and the summary after.

The daemon sends progress events over the control socket with these fields
(all optional, unknown ones ignored):

``phase`` (reserve, precopy, stop-and-copy, prepare, ...), ``round``,
``pages_left`` (pages dirty, still to send), ``dirty_rate`` (bytes/s the guest
dirties), ``bandwidth`` (bytes/s on the wire), ``expected_downtime_ms``,
``bytes_sent`` (total so far), ``round_bytes_sent`` and ``round_bytes_total``
(this round), ``percent`` (within the round), ``eta_s``, ``bytes_remaining``,
``bytes_total``, and ``domain`` (which domain: `evacuate` moves several).

On a terminal one line per domain is redrawn in place, cut to the terminal's
width (the least useful numbers go first).  Elsewhere (a pipe, a log, CI) a
plain line with the numbers is printed at most once per interval (a few
seconds) per domain; events that carry no numbers (``[reserve]``) print
nothing there.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from relocd.units import format_bytes, format_duration, format_rate

#: How often a plain (non-terminal) line is printed at most, per domain.
PLAIN_INTERVAL_S = 3.0
#: How often the terminal display is redrawn at most.
TTY_INTERVAL_S = 0.1
#: Fields that describe the current round (or phase): forgotten when a new one starts.
_ROUND_FIELDS = ("pages_left", "percent", "eta_s", "round_bytes_sent", "round_bytes_total",
                 "bytes_remaining", "bytes_total", "expected_downtime_ms", "dirty_rate",
                 "bandwidth")
#: The fields that make an event worth a plain line.
_NUMBERS = ("pages_left", "bytes_sent", "round_bytes_sent", "percent", "bandwidth", "eta_s",
            "bytes_remaining")


def _number(event: Mapping[str, Any], key: str) -> float | None:
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def percent_of(event: Mapping[str, Any]) -> float | None:
    """The round's percentage: the daemon's, else from the round's bytes; 0 to 100."""
    pct = _number(event, "percent")
    if pct is None:
        sent, total = _number(event, "round_bytes_sent"), _number(event, "round_bytes_total")
        if sent is not None and total:
            pct = 100.0 * sent / total
    return None if pct is None else min(100.0, max(0.0, pct))


def _segments(event: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(priority, text) pieces of the line, in display order; the lowest priority is kept longest.

    A piece that starts with a space continues the one before it (``34%`` `` of 2.0 GiB``).
    """
    parts: list[tuple[int, str]] = []
    pct = percent_of(event)
    if pct is not None:
        parts.append((1, f"{pct:.0f}%"))
        sent, total = _number(event, "round_bytes_sent"), _number(event, "round_bytes_total")
        if sent is not None and total:
            parts.append((5, f" of {format_bytes(total)}"))
    eta = _number(event, "eta_s")
    if eta is not None:
        parts.append((2, f"ETA {format_duration(eta)}"))
    pages_left = _number(event, "pages_left")
    if pages_left is not None:
        parts.append((4, f"{int(pages_left):,} pages dirty"))
    dirty_rate = _number(event, "dirty_rate")
    if dirty_rate is not None:
        parts.append((6, f"dirtying {format_rate(dirty_rate)}"))
    bandwidth = _number(event, "bandwidth")
    if bandwidth is not None:
        parts.append((3, f"sending {format_rate(bandwidth)}"))
    bytes_sent = _number(event, "bytes_sent")
    if bytes_sent is not None:
        parts.append((5, f"{format_bytes(bytes_sent)} sent"))
    remaining = _number(event, "bytes_remaining")
    if remaining is not None:
        parts.append((8, f"{format_bytes(remaining)} left"))
    downtime = _number(event, "expected_downtime_ms")
    if downtime is not None:
        parts.append((7, f"expected downtime {downtime:,.1f} ms"))
    throttle = _number(event, "throttle_pct")
    if throttle:  # auto-converge slowed the guest down (it stays on until the pause)
        parts.append((4, f"guest throttled {throttle:.0f}%"))
    return parts


def _head(event: Mapping[str, Any], label: str | None) -> str:
    rnd = _number(event, "round")
    head = f"round {int(rnd)}" if rnd is not None else ""
    phase = event.get("phase")
    if isinstance(phase, str) and phase:
        head = f"{head} [{phase}]" if head else f"[{phase}]"
    if label:
        head = f"{label}: {head}" if head else label
    return head


def describe(event: Mapping[str, Any], width: int | None = None, label: str | None = None) -> str:
    """One line for a progress event, e.g. ``round 3 [precopy]: 45% of 2.0 GiB, ETA 4 s, ...``.

    With ``width``, the least useful numbers are left out until the line fits
    (and the line is cut as a last resort).
    """
    head = _head(event, label)
    parts = _segments(event)
    while True:
        body = "".join(text if text.startswith(" ") or i == 0 else ", " + text
                       for i, (_, text) in enumerate(parts))
        line = f"{head}: {body}" if head and body else (head or body or "working")
        if width is None or len(line) <= width or not parts:
            break
        worst = max(range(len(parts)), key=lambda i: (parts[i][0], i))
        del parts[worst]
    if width is not None and len(line) > width:
        line = line[: max(width - 3, 1)] + "..."
    return line


def merge_event(known: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    """What is known of a migration after ``event``."""
    merged = dict(known)
    phase, rnd = event.get("phase"), event.get("round")
    new_phase = phase is not None and phase != known.get("phase")
    if new_phase or (rnd is not None and rnd != known.get("round")):
        for key in _ROUND_FIELDS:
            merged.pop(key, None)
        if new_phase and rnd is None:
            merged.pop("round", None)
    if "bytes_remaining" in event and "pages_left" not in event:
        merged.pop("pages_left", None)  # the round's count at its start: stale once bytes flow
    merged.update((k, v) for k, v in event.items() if v is not None)
    return merged


def has_numbers(event: Mapping[str, Any]) -> bool:
    return any(_number(event, key) is not None for key in _NUMBERS)


def terminal_width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


class MigrationProgress:
    """Turns progress events into live lines (terminal) or periodic plain lines (pipe).

    ``multi``: events carry ``domain`` and each domain gets its own line
    (`evacuate`); otherwise one line, whatever the events say.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] = terminal_width,
        multi: bool = False,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval_s = (TTY_INTERVAL_S if self.tty else PLAIN_INTERVAL_S) if interval_s is None else interval_s
        self.multi = multi
        self._clock = clock
        self._width = width
        #: label -> latest event (insertion order = line order on a terminal)
        self._latest: dict[str, Mapping[str, Any]] = {}
        #: label -> when its last plain line was printed
        self._printed_at: dict[str, float] = {}
        #: label -> an event with numbers not printed yet (plain output)
        self._unprinted: dict[str, Mapping[str, Any]] = {}
        self._drawn_at: float | None = None
        self._drawn_lines = 0
        self._dirty = False
        self._suspended = False

    def _label(self, event: Mapping[str, Any]) -> str:
        if not self.multi:
            return ""
        name = event.get("domain")
        return name if isinstance(name, str) and name else "?"

    def update(self, event: Mapping[str, Any]) -> None:
        """Take one event; draw it now if due.

        Events may carry part of the picture (a phase change, then the byte
        counts of its round): they are merged into what is known of the
        domain, and a new round or phase forgets the last one's numbers.
        """
        label = self._label(event)
        fresh_numbers = has_numbers(event)
        event = merge_event(self._latest.get(label, {}), event)
        self._latest[label] = event
        now = self._clock()
        if self.tty:
            self._dirty = True
            if self._suspended:
                return
            if self._drawn_at is None or now - self._drawn_at >= self.interval_s:
                self._redraw(now)
            return
        if not fresh_numbers:  # a bare phase change: shown with the next numbers
            return
        self._unprinted[label] = event
        if not self._suspended:
            self._print_due(now)

    def tick(self) -> None:
        """Draw what is due though no event came (the watcher calls this every interval)."""
        now = self._clock()
        if self._suspended:
            return
        if self.tty:
            if self._dirty and (self._drawn_at is None or now - self._drawn_at >= self.interval_s):
                self._redraw(now)
        else:
            self._print_due(now)

    def _print_due(self, now: float) -> None:
        for label, event in list(self._unprinted.items()):
            last = self._printed_at.get(label)
            if last is None or now - last >= self.interval_s:
                self._printed_at[label] = now
                del self._unprinted[label]
                self.stream.write(describe(event, label=label or None) + "\n")
                self.stream.flush()

    def _redraw(self, now: float) -> None:
        width = max(self._width() - 1, 20)  # the last column would wrap on some terminals
        lines = [describe(ev, width, label or None) for label, ev in self._latest.items()]
        out = ["\r"]
        if self._drawn_lines > 1:
            out.append(f"\x1b[{self._drawn_lines - 1}A")
        for i, line in enumerate(lines):
            out.append(line + "\x1b[K")
            if i < len(lines) - 1:
                out.append("\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn_lines = len(lines)
        self._drawn_at = now
        self._dirty = False

    def suspend(self) -> None:
        """Leave the live lines for a question (Ctrl-C); updates are kept, not drawn."""
        if self.tty and self._dirty:
            self._redraw(self._clock())
        self._close_lines()
        self._suspended = True

    def resume(self) -> None:
        self._suspended = False
        if self.tty and self._latest:
            self._redraw(self._clock())

    def finish(self) -> None:
        """Draw what is not drawn yet and leave the cursor on a fresh line."""
        if self.tty and self._dirty and not self._suspended:
            self._redraw(self._clock())
        self._close_lines()
        self._suspended = False
        self.stream.flush()

    def _close_lines(self) -> None:
        if self._drawn_lines:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn_lines = 0
            self._drawn_at = None


# --- after the migration ----------------------------------------------------------


def _seconds(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms < 1000 else f"{ms / 1000:,.2f} s"


def _mode(result: Mapping[str, Any]) -> str:
    return "live" if result.get("live") else "non-live"


def summarize_migration(result: Mapping[str, Any], host: str) -> str:
    """A paragraph saying how a completed migration went, from its result object.

    (A migration that did not complete is one line on stderr: see
    :func:`describe_failure`.)
    """
    name = result.get("domain", "?")
    status = result.get("status", "failed")
    total_ms = _number(result, "total_ms") or 0.0
    if status != "completed":
        return describe_failure(result, host) + "."
    rounds = int(_number(result, "iterations") or 0)
    pages = int(_number(result, "pages_sent") or 0)
    sent = _number(result, "bytes_sent") or 0.0
    downtime = _number(result, "downtime_ms") or 0.0
    text = (
        f"Migrated {name} to {host} ({_mode(result)}) in {_seconds(total_ms)}: "
        f"{rounds} round{'s' if rounds != 1 else ''}, {pages:,} pages sent "
        f"({format_bytes(sent)}), downtime {downtime:,.1f} ms"
    )
    target = _number(result, "downtime_target_ms")
    if target is not None:
        text += f" (target {target:,.0f} ms)"
    verified = result.get("verified")
    if verified is True:
        text += ", memory verified"
    elif verified is False:
        text += ", memory verification FAILED"
    text += "."
    reason = result.get("stop_reason")
    if isinstance(reason, str) and reason:
        text += f" Precopy stopped: {reason}."
    throttle = result.get("throttle_pct")
    if isinstance(throttle, (int, float)) and not isinstance(throttle, bool) and throttle > 0:
        text += f" Auto-converge throttled the guest to {100 - throttle:.0f}% of its speed."
    warning = result.get("downtime_warning")
    if isinstance(warning, str) and warning:
        text += f"\nwarning: {warning}"
    return text


def describe_failure(result: Mapping[str, Any], host: str) -> str:
    """One line for a migration that did not complete: what happened, and where the domain is."""
    name = result.get("domain", "?")
    status = result.get("status") or "failed"
    error = result.get("error")
    total_ms = _number(result, "total_ms") or 0.0
    outcome = {"rolled-back": "rolled back", "cancelled": "was cancelled"}.get(str(status), str(status))
    text = f"migration of {name} to {host} {outcome}"
    if total_ms >= 1000 and status != "failed":
        text += f" after {_seconds(total_ms)}"
    if error:
        text += f": {error}"
    if status in ("rolled-back", "cancelled"):
        text += f"; {name} stays on this host"
    return text
