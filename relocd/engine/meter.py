"""Progress a person can trust: bytes sent, remaining and total, inside every round.

A round of a large guest (round 1 sends all of it) takes seconds to
minutes; reporting only at round ends makes it look frozen.  ``RoundMeter``
is fed after every batch and says when the next progress event is due (at
most every ``interval`` seconds, and at the round's start and end), with a
percentage that never runs backwards and an ETA that never grows within a
round (a slow batch holds it, it does not push it back).  The rate behind
the ETA is measured from the end of the round's first batch, so a first
batch that leaves at once (a rate limiter's burst, a socket buffer) does not
promise a speed the round never keeps; no ETA is given before WARMUP_S.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from relocd.units import PAGE_SIZE

#: Seconds between two progress events inside a round.
INTERVAL_S = 0.25
#: Seconds of a round's sending before its rate (and ETA) is trusted.
WARMUP_S = 0.5


class RoundMeter:
    """One round's progress; ``bytes_before`` is what earlier rounds sent."""

    def __init__(
        self,
        round_no: int,
        pages_total: int,
        bytes_before: int,
        *,
        interval: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.round = round_no
        self.pages_total = pages_total
        self.bytes_before = bytes_before
        self.interval = interval
        self._clock = clock
        self._t0 = clock()
        self._last_event = float("-inf")
        self.pages_done = 0
        self.bytes_done = 0
        self._eta: float | None = None
        #: (time, pages done) at the end of the first batch: where the rate is measured from
        self._origin: tuple[float, int] | None = None

    def add(self, pages: int, nbytes: int) -> None:
        self.pages_done = min(self.pages_total, self.pages_done + pages)
        self.bytes_done += nbytes
        if self._origin is None:
            self._origin = (self._clock(), self.pages_done)

    def due(self) -> bool:
        """Is a progress event due now (the interval has passed)?"""
        return self._clock() - self._last_event >= self.interval

    def event(self) -> dict[str, Any]:
        """The fields of a progress event now (and marks it sent)."""
        now = self._clock()
        self._last_event = now
        total = self.pages_total * PAGE_SIZE
        done = self.pages_done * PAGE_SIZE
        remaining = total - done
        percent = 100.0 if self.pages_total == 0 else 100.0 * self.pages_done / self.pages_total
        rate: float | None = None
        if self._origin is not None:
            since, pages_then = self._origin
            if now - since >= WARMUP_S and self.pages_done > pages_then:
                rate = (self.pages_done - pages_then) * PAGE_SIZE / (now - since)
                eta = remaining / rate
                self._eta = eta if self._eta is None else min(self._eta, eta)
        if remaining == 0:
            self._eta = 0.0
        return {
            "round": self.round,
            "bytes_sent": self.bytes_before + self.bytes_done,
            "round_bytes_sent": done,
            "round_bytes_total": total,
            "bytes_remaining": remaining,
            "bytes_total": total,
            "percent": round(percent, 1),
            "eta_s": None if self._eta is None else round(self._eta, 2),
            **({"bandwidth": round(rate, 1)} if rate is not None else {}),
        }
