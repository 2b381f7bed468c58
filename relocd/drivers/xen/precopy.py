"""libxenguest's precopy_policy callback answered by relocd's PrecopyPolicy.

``xc_domain_save`` (Xen 4.17, ``xg_sr_save.c: send_memory_live``) owns the
live loop and asks its policy twice per round:

* before a round, with ``dirty_count`` = the pages it is about to send
  (``iteration`` 0: the whole guest; later: what the log-dirty bitmap just
  said), and
* after the round, with ``dirty_count = -1`` (not yet known) and
  ``total_written`` grown by what was sent.

relocd's policy decides on whole rounds, with the dirty set known, so:
after-round calls record the round (pages, bytes, duration) and continue;
the next before-round call makes the ``RoundStats`` (round N, its pages and
bytes, ``dirty_pages`` = the fresh dirty count) and asks
``policy.should_stop``: a reason means STOP_AND_COPY.  libxenguest then
still sends that dirty set while the guest runs, suspends it, and sends what
was dirtied meanwhile — so a stop costs one more (small) live round than in
relocd's own engine.  A cancel answers ABORT.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from relocd.drivers.base import RoundDecision as RoundDecision
from relocd.engine.policy import PrecopyPolicy, RoundStats

#: XGS_POLICY_* (xenguest.h)
ABORT = -1
CONTINUE_PRECOPY = 0
STOP_AND_COPY = 1




class DecisionOnly:
    """A bare decision function (RoundStats -> stop reason or None) as a PrecopyPolicy."""

    def __init__(self, decide: Callable[[RoundStats], str | None]) -> None:
        self._decide = decide

    def should_stop(self, stats: RoundStats) -> str | None:
        return self._decide(stats)

    def expected_downtime_ms(self, stats: RoundStats) -> float | None:
        return None


class PolicyBridge:
    """Turns libxenguest's (iteration, total_written, dirty_count) calls into relocd policy decisions.

    ``bytes_out`` reports the bytes of stream written so far (the pipe's
    reader counts them), so rounds carry real on-the-wire sizes.  Called from
    libxenguest's thread; ``cancel`` may be called from any thread.
    """

    def __init__(
        self,
        policy: PrecopyPolicy,
        bytes_out: Callable[[], int] = lambda: 0,
        *,
        on_round: Callable[[RoundDecision], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._bytes_out = bytes_out
        self._on_round = on_round
        self._clock = clock
        self._cancelled = threading.Event()
        self.rounds: list[RoundDecision] = []
        self.memory_pages = 0
        self.stop_reason: str | None = None
        self.calls = 0
        self._round_start = 0.0
        self._bytes_at_start = 0
        self._pages_total = 0
        self._done: tuple[int, int, float] | None = None  # pages, bytes, seconds of the round just sent

    def cancel(self) -> None:
        self._cancelled.set()

    def count_bytes_with(self, bytes_out: Callable[[], int]) -> None:
        """Where the stream's byte count comes from (the pump that reads the save's pipe)."""
        self._bytes_out = bytes_out

    def decide(self, iteration: int, total_written: int, dirty_count: int) -> int:
        """libxenguest's question; one of ABORT, CONTINUE_PRECOPY, STOP_AND_COPY."""
        self.calls += 1
        if self._cancelled.is_set():
            return ABORT
        now = self._clock()
        if dirty_count < 0:
            # A round has just been sent; its dirty set comes with the next call.
            written = self._bytes_out()
            self._done = (total_written - self._pages_total, written - self._bytes_at_start, now - self._round_start)
            self._pages_total = total_written
            return CONTINUE_PRECOPY
        if iteration == 0 or self._done is None:
            # Before the first round: everything is dirty, send it all.
            self.memory_pages = self.memory_pages or dirty_count
            self._start_round(now)
            return CONTINUE_PRECOPY
        pages, nbytes, seconds = self._done
        self._done = None
        stats = RoundStats(
            round=iteration,
            pages_sent=pages,
            bytes_sent=nbytes,
            total_bytes_sent=self._bytes_out(),
            duration_s=seconds,
            dirty_pages=dirty_count,
            memory_pages=self.memory_pages or max(dirty_count, 1),
        )
        reason = self.policy.should_stop(stats)
        expected = self.policy.expected_downtime_ms(stats)
        decision = RoundDecision(
            stats.round, pages, nbytes, stats.total_bytes_sent, seconds, dirty_count, reason, expected
        )
        self.rounds.append(decision)
        if self._on_round is not None:
            self._on_round(decision)
        self._start_round(now)
        if reason is None:
            return CONTINUE_PRECOPY
        self.stop_reason = reason
        return STOP_AND_COPY

    def _start_round(self, now: float) -> None:
        self._round_start = now
        self._bytes_at_start = self._bytes_out()
