"""The sending side of a migration: reserve, precopy, stop-and-copy, handoff.

The rule this module exists to keep: the domain runs on exactly one host.
Before GO, any failure resumes the local copy (the target destroys its own).
GO is journaled durably before it is sent; after it, the local copy stays
paused until the target says what happened (RESUMED, or an OUTCOME when we
have to reconnect and ask).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from relocd.cluster.handoff import source_reserve, source_reserved
from relocd.config.domain import config_to_sxp
from relocd.drivers.base import Domain
from relocd.engine.channels import SendChannels, run_together
from relocd.engine.converge import AutoConverge
from relocd.engine.source_ending import HandoffEnding
from relocd.engine.faults import fault_point
from relocd.engine.handshake import digest_algo_for, hello, host_id
from relocd.engine.hooks import DomainHooks
from relocd.engine.journal import PLAIN, Journal, Phase
from relocd.engine.pages import (
    bitmap_to_pfns,
    iter_batches,
    memory_digest,
    split_zero_pages,
)
from relocd.engine.localcopy import LocalCopy
from relocd.engine.meter import RoundMeter
from relocd.engine.policy import MAX_FACTOR, NO_PROGRESS, DowntimePolicy, PrecopyPolicy, RateLimiter, RoundStats
from relocd.engine.query import Reconnect, settle_abort
from relocd.engine.result import MigrationResult, Progress, RoundReport, no_progress
from relocd.engine.stream import PeerGone, RecordChannel
from relocd.engine.transfer import transfer_for
from relocd.errors import (
    ConfigError,
    DomainBusy,
    MigrationAborted,
    ProtocolError,
    Reason,
    RelocdError,
    ReservationRefused,
)
from relocd.protocol.records import (
    Abort,
    Commit,
    Config,
    Digest,
    DigestAlgo,
    EndRound,
    Feature,
    Prepared,
    Record,
    Refuse,
    Reserve,
    Reserved,
    Role,
    Stop,
    VcpuState,
)
from relocd.units import PAGE_SIZE

if TYPE_CHECKING:
    from relocd.cluster.ownership import Ownership

log = structlog.get_logger("relocd.source")

Pfns = npt.NDArray[np.uint64]

@dataclasses.dataclass
class SendOptions:
    live: bool
    verify: bool
    policy: PrecopyPolicy
    max_bandwidth: int | None = None
    #: pages per PAGES record: 8 MiB, half the default max frame
    batch_pages: int = 2048
    source_port: int | None = None
    #: how long a lost link post-GO is worked on before the operator is told
    #: it is in doubt (relocd keeps asking after that, until the target answers)
    recovery_s: float = 30.0
    #: how the target was dialled (journaled, so a restart dials the same way)
    transport: str = PLAIN
    server_name: str | None = None
    #: a live migration not converged after this many seconds is ended (None: never) ...
    timeout_s: float | None = None
    #: ... by TIMEOUT_ABORT (rolled back, the domain runs on here) or TIMEOUT_STOP (stop-and-copy now)
    timeout_action: str = "abort"
    #: page channels to ask for, the main connection included (engine/channels.py)
    channels: int = 1
    #: throttle a guest that dirties faster than the link carries (engine/converge.py)
    auto_converge: bool = False
    #: the cluster store's ownership records arbitrate the handoff (None: journal only)
    cluster: Ownership | None = None


TIMEOUT_ABORT = "abort"
TIMEOUT_STOP = "stop"
#: a stop-and-copy predicted to overshoot the downtime target by more than this is warned about
OVERSHOOT_WARNING = 2.0


_T = TypeVar("_T")

#: Background tasks telling a target to drop a prepared copy (kept referenced).
_FOLLOW_UPS: set[asyncio.Task[None]] = set()


def settling_task_name(migration_id: str) -> str:
    """The name of a task that settles a migration with its peer (relocd settle cancels it)."""
    return f"settle:{migration_id}"


def new_migration_id() -> str:
    return str(uuidlib.uuid4())


class SourceMigration(HandoffEnding):
    """One outgoing migration of one domain over one channel."""

    def __init__(
        self,
        domain: Domain,
        channel: RecordChannel,
        options: SendOptions,
        *,
        journal: Journal,
        migration_id: str,
        target: str,
        reconnect: Reconnect | None = None,
        progress: Progress = no_progress,
        hooks: DomainHooks | None = None,
        on_batch: Callable[[Pfns, Pfns], None] | None = None,
        dial_channel: Reconnect | None = None,
    ) -> None:
        self.domain = domain
        #: connects one more page channel (None: the main connection only)
        self.dial_channel = dial_channel
        #: the page channels: the main connection, then the extras the target granted
        self.lanes = SendChannels(channel)
        self._peer_features = 0
        #: told (data pfns, zero pfns) just before each PAGES record goes out
        self.on_batch = on_batch
        self.hooks = hooks or DomainHooks()
        self.name = domain.name
        self.channel = channel
        self.opts = options
        self.journal = journal
        self.mid = migration_id
        self.target = target
        self.reconnect = reconnect
        self.progress = progress
        self.result = MigrationResult(domain=self.name, live=options.live, migration_id=migration_id, target=target)
        self.limiter = RateLimiter(options.max_bandwidth)
        self.log = log.bind(migration_id=migration_id, domain=self.name, target=target)
        self.paused_at: float | None = None
        #: our copy's fate: paused, renamed, handed over or rolled back (engine/localcopy.py)
        self.copy = LocalCopy(domain, self.name, journal, migration_id, self.hooks, self.log)
        self._pending = np.empty(0, dtype=np.uint64)
        self._digest_algo = DigestAlgo.SHA256
        self.committed = False
        #: set once with the interim result when a lost link post-GO has not
        #: settled within recovery_s; the migration goes on asking
        self.in_doubt_notice: asyncio.Future[MigrationResult] | None = None
        #: set (synchronously) as the handoff begins: from here no abort, only its ending
        self.past_go = False
        self._abort_reason: str | None = None
        self._task: asyncio.Task[object] | None = None
        self._started = time.monotonic()
        self._last_stats: RoundStats | None = None
        self.converge = AutoConverge(enabled=options.auto_converge and domain.throttles)
        self.result.auto_converge = self.converge.enabled

    @classmethod
    def in_doubt(
        cls,
        domain: Domain,
        original_name: str,
        options: SendOptions,
        *,
        journal: Journal,
        migration_id: str,
        target: str,
        reconnect: Reconnect,
        hooks: DomainHooks | None = None,
    ) -> SourceMigration:
        """A migration found at GO_SENT after a daemon restart: only the ending is left."""
        self = cls(
            domain,
            None,  # type: ignore[arg-type]
            options,
            journal=journal,
            migration_id=migration_id,
            target=target,
            reconnect=reconnect,
            hooks=hooks,
        )
        self.name = original_name
        self.result.domain = original_name
        self.copy = LocalCopy.in_doubt(domain, original_name, journal, migration_id, self.hooks, self.log)
        return self

    async def resolve(self) -> MigrationResult:
        """Ask the target what happened after GO and act on it."""
        return await self._recover_after_go()

    # -- top level -----------------------------------------------------------

    # -- operator's control (relocd abort, migrate-set) ------------------------------

    def request_abort(self, why: str = "cancelled by the operator") -> None:
        """Cancel before GO: the domain runs on here, the target drops its copy.

        Never awaits, so it cannot race the handoff: once ``past_go`` is set
        (synchronously, before the handoff's first await) it is refused.
        """
        if self.past_go:
            raise DomainBusy(f"{self.name} is past GO: the handoff completes or rolls back by itself")
        if self._abort_reason is None:
            self._abort_reason = why
            if self._task is not None:
                self._task.cancel()

    def set_limits(self, *, downtime_ms: int | None = None, max_bandwidth: int | None = None) -> None:
        """migrate-set: the next round (and the next batch, for bandwidth) uses these."""
        if downtime_ms is not None:
            if not isinstance(self.opts.policy, DowntimePolicy):
                raise ConfigError("this migration's policy (xend) has no downtime target; start it with the downtime policy")
            self.opts.policy.downtime_ms = downtime_ms
        if max_bandwidth is not None:
            self.limiter = RateLimiter(max_bandwidth)
            self.opts.max_bandwidth = max_bandwidth

    def _check_timeout(self) -> str | None:
        """The live migration has run past its --timeout: abort (raises) or say stop."""
        limit = self.opts.timeout_s
        if limit is None or time.monotonic() - self._started < limit:
            return None
        if self.opts.timeout_action == TIMEOUT_STOP:
            return "timeout"
        raise RelocdError(f"did not converge within {limit:g} s (--timeout-action abort)", reason=Reason.CANCELLED)

    # -- top level -----------------------------------------------------------

    async def run(self) -> MigrationResult:
        journaled = False
        self._task = asyncio.current_task()
        try:
            peer_hello = await hello(self.channel, Role.SOURCE, self.mid)
            self._digest_algo = digest_algo_for(peer_hello.features)
            self._peer_features = peer_hello.features
            await fault_point("source", "hello")
            granted = await self._reserve()
            await fault_point("source", "reserve")
            self.journal.begin(
                self.mid, "source", self.name, self.domain.config.uuid, self.target, self.opts.live,
                transport=self.opts.transport, server_name=self.opts.server_name,
            )  # fmt: skip
            journaled = True
            self.journal.set_phase(self.mid, Phase.RESERVED)
            self.result.mark("reserved")
            if granted is not None:  # the target holds a reservation: a failure from here rolls back
                await self.lanes.open(self.dial_channel, self.mid, *granted)  # type: ignore[arg-type]
            await self.send(Config(config_to_sxp(await self.domain.read_config())))
            await fault_point("source", "config")
            await transfer_for(self.domain).send(self)
            await self._expect_prepared()
        except ReservationRefused as exc:
            self.log.warning("reservation refused", reason=exc.reason.name, error=exc.message)
            await self.channel.close()
            return self.result.finish("failed", exc.message)
        except (RelocdError, OSError) as exc:
            msg = exc.message if isinstance(exc, RelocdError) else f"I/O error: {exc}"
            await self._abort_before_go(exc, journaled)
            return self.result.finish("rolled-back" if journaled else "failed", msg)
        except asyncio.CancelledError:
            why = self._abort_reason
            if why is not None and self._task is not None and self._task.uncancel() == 0:
                # relocd abort: an ABORT goes to the target, which drops its copy.
                await self._abort_before_go(RelocdError(why, reason=Reason.CANCELLED), journaled)
                return self.result.finish("cancelled", why)
            await self._abort_before_go(MigrationAborted("cancelled", reason=Reason.CANCELLED), journaled)
            raise
        finally:
            # Every extra channel has ended by PREPARED (or the migration failed).
            await self.lanes.close()
        return await self._handoff()

    # -- sending ---------------------------------------------------------------

    async def _unless_stuck(self, sending: Awaitable[_T], channel: RecordChannel | None = None) -> _T:
        """A send that makes no progress for the idle timeout means the peer is gone.

        Without this a peer (or a network) that stops reading leaves us blocked
        on a full socket buffer forever, the domain paused if it happens after STOP.
        """
        timeout = getattr(channel or self.channel, "read_timeout", None)
        if timeout is None:
            return await sending
        try:
            async with asyncio.timeout(timeout):
                return await sending
        except TimeoutError:
            raise PeerGone(f"peer took no data for {timeout:g} s", reason=Reason.TIMEOUT) from None

    async def send(self, record: Record) -> None:
        await self._unless_stuck(self.channel.send(record))

    # -- phases --------------------------------------------------------------

    def _channels_wanted(self) -> int:
        """Page channels to ask for: only where both ends speak them and pages are ours to stripe."""
        if (
            self.opts.channels > 1
            and self.dial_channel is not None
            and self._peer_features & Feature.CHANNELS
            and transfer_for(self.domain).stripes
        ):
            return self.opts.channels
        return 1

    async def _reserve(self) -> tuple[bytes, int] | None:
        """RESERVE; returns (token, count) when the target granted extra page channels."""
        cfg = await self.domain.read_config()  # the whole config (a Xen domain's listing has no disks)
        request = {
            "name": cfg.name,
            "uuid": cfg.uuid,
            "memory_bytes": cfg.memory_bytes,
            "vcpus": cfg.vcpus,
            "driver": cfg.driver,
            "cpu_features": list(cfg.cpu_features),
            "bridges": sorted({v.bridge for v in cfg.vifs if v.bridge}),
            "live": self.opts.live,
            "verify": self.opts.verify,
            "host_id": host_id(),
            "source_port": self.opts.source_port,
            "disks": list(cfg.disks),
        }
        wanted = self._channels_wanted()
        if wanted > 1:
            request["channels"] = wanted
        await self.progress(phase="reserve")
        await source_reserve(self, request)
        await self.send(Reserve(request))
        answer = await self.channel.recv()
        if isinstance(answer, Refuse):
            raise ReservationRefused(f"target refused: {answer.message}", reason=answer.reason)
        if isinstance(answer, Abort):  # e.g. our RESERVE arrived corrupted
            raise MigrationAborted(f"target aborted: {answer.message}", reason=answer.reason)
        assert isinstance(answer, Reserved)
        source_reserved(self, answer.info)
        free = answer.info.get("free_bytes")  # optional: older targets do not say
        if isinstance(free, int) and not isinstance(free, bool):
            self.result.target_free_bytes = free
        count, token = answer.info.get("channels", 1), answer.info.get("channel_token")
        if wanted == 1 or count == 1:
            return None
        if not (isinstance(count, int) and 2 <= count <= wanted and isinstance(token, str)):
            raise ProtocolError(f"target granted {count!r} channels ({wanted} asked)")
        try:
            raw = bytes.fromhex(token)
        except ValueError:
            raise ProtocolError("target's channel token is not hex") from None
        self.result.channels = count
        return raw, count

    async def precopy(self) -> Pfns:
        """Run the precopy rounds (the policy decides when to stop); returns the pages still dirty.

        The dirty log stays on: the caller pauses the domain, fetches the log
        once more and sends the union (a savefile checkpoint reuses this).
        """
        await self._precopy()
        return self._pending

    async def send_pfns(self, round_no: int, pfns: Pfns) -> tuple[int, int]:
        """Send these pages in PAGES records of round ``round_no``; returns (pages, bytes)."""
        return await self._send_pfns(round_no, pfns)

    async def _send_pfns(self, round_no: int, pfns: np.ndarray) -> tuple[int, int]:
        """Send pages (zero pages as pfns only), each channel its share at once; returns (pages, bytes).

        Progress goes out every 250 ms inside the round (engine/meter.py).
        """
        memory = self.domain.memory()
        meter = RoundMeter(round_no, len(pfns), self.result.bytes_sent)
        lanes = self.lanes

        async def send_share(index: int, share: Pfns) -> tuple[int, int]:
            channel = lanes.channels[index]
            pages = nbytes = 0
            for batch in iter_batches(share, self.opts.batch_pages):
                data, zero = split_zero_pages(memory, batch)
                if self.on_batch is not None:
                    self.on_batch(data, zero)
                n = await self._unless_stuck(channel.send_pages(round_no, data, zero, memory), channel)
                pages += len(batch)
                nbytes += n
                lanes.pages[index] += len(batch)
                self.result.zero_pages += len(zero)
                meter.add(len(batch), n)
                if meter.due():
                    await self.progress(**meter.event())
                if self.paused_at is None and self.opts.timeout_action == TIMEOUT_ABORT:
                    self._check_timeout()  # an abort does not wait for the round's end
                delay = self.limiter.delay_for(n)
                if delay > 0:
                    await asyncio.sleep(delay)
            return pages, nbytes

        shares = [(i, share) for i, share in enumerate(lanes.split(pfns)) if len(share)]
        sent = await run_together([send_share(i, share) for i, share in shares])
        pages = sum(p for p, _ in sent)
        nbytes = sum(n for _, n in sent)
        if pages:
            await self.progress(**meter.event())  # the round's end: 100%, whatever the interval
        self.result.pages_sent += pages
        self.result.bytes_sent += nbytes
        return pages, nbytes

    async def _precopy(self) -> None:
        dom = self.domain
        npages = dom.npages
        await self.copy.start_dirty_log()
        pfns = np.arange(npages, dtype=np.uint64)
        round_no = 1
        total_bytes = 0
        while True:
            t0 = time.monotonic()
            await self.progress(phase="precopy", round=round_no, pages_left=len(pfns))
            pages, nbytes = await self._send_pfns(round_no, pfns)
            if round_no <= 2:
                await fault_point("source", f"precopy-{round_no}")
            bitmap = await dom.dirty_log_fetch()
            pfns = bitmap_to_pfns(bitmap, npages)
            dt = time.monotonic() - t0
            total_bytes += nbytes
            await self.send(EndRound(round_no, pages, len(pfns)))
            self.result.iterations = round_no
            self.result.rounds.append(
                RoundReport(round_no, pages, nbytes, round(dt * 1000, 3), len(pfns))
            )
            stats = RoundStats(
                round=round_no,
                pages_sent=pages,
                bytes_sent=nbytes,
                total_bytes_sent=total_bytes,
                duration_s=dt,
                dirty_pages=len(pfns),
                memory_pages=npages,
            )
            self._last_stats = stats
            reason = self.opts.policy.should_stop(stats) or self._check_timeout()
            expected = self.opts.policy.expected_downtime_ms(stats)
            reason = await self._converge(stats, expected, reason)
            bw = nbytes / dt if dt > 0 else 0.0
            await self.progress(
                phase="precopy",
                round=round_no,
                pages_left=len(pfns),
                dirty_rate=len(pfns) * PAGE_SIZE / dt if dt > 0 else 0.0,
                bandwidth=bw,
                expected_downtime_ms=expected,
                throttle_pct=round(self.converge.throttle * 100, 1),
            )
            self.log.info("precopy round", round=round_no, pages=pages, dirty=len(pfns), ms=round(dt * 1000, 1))
            if reason is not None:
                self.result.stop_reason = reason
                self._pending = pfns
                return
            round_no += 1

    async def _converge(self, stats: RoundStats, expected: float | None, reason: str | None) -> str | None:
        """Auto-converge after a round: throttle up where the guest outruns the link.

        A stop for lack of progress or for the traffic budget waits while the
        throttle can still rise; the timeout, the round limit and a good
        stop do not.
        """
        if reason in (NO_PROGRESS, MAX_FACTOR) and self.converge.may_rise:
            reason = None
        if reason is not None:
            return reason
        target = getattr(self.opts.policy, "downtime_ms", None)
        fraction = self.converge.after_round(stats, expected, float(target) if target is not None else None)
        if fraction is not None:
            self.log.info("auto-converge: throttling the guest", round=stats.round, throttle_pct=round(fraction * 100, 1))
            await self.copy.throttle(fraction)
            self.result.throttle_pct = round(fraction * 100, 1)
        return None

    def _warn_overshoot(self) -> None:
        """Say so when the stop-and-copy is predicted to take over twice the downtime target."""
        policy = self.opts.policy
        if not isinstance(policy, DowntimePolicy):
            return
        target = policy.downtime_ms
        self.result.downtime_target_ms = float(target)
        if self._last_stats is None:
            return
        expected = policy.expected_downtime_ms(self._last_stats)
        if expected is not None and expected > OVERSHOOT_WARNING * target:
            warning = (
                f"stop-and-copy predicted to take {expected:,.0f} ms, over {OVERSHOOT_WARNING:g}x "
                f"the {target:g} ms downtime target"
            )
            self.result.downtime_warning = warning
            self.log.warning("downtime target will be missed", expected_ms=round(expected, 1), target_ms=target)

    async def stop_and_copy(self) -> None:
        dom = self.domain
        self._warn_overshoot()
        await self.progress(phase="stop-and-copy")
        # The intent before the act, and one fsync less inside the downtime:
        # a restart at STOPPED rolls back (resumes a paused copy) either way.
        self.journal.set_phase(self.mid, Phase.STOPPED)
        self.paused_at = time.monotonic()
        self.result.mark("pausing")
        await self.copy.pause()
        self.result.mark("paused")  # a throttle stays: only a rollback runs it here again, and lifts it
        if self.opts.live:
            # Pages dirtied since the last fetch, plus the last round's dirty set.
            final = bitmap_to_pfns(await dom.dirty_log_fetch(), dom.npages)
            pfns = np.union1d(self._pending, final).astype(np.uint64)
            round_no = self.result.iterations + 1
        else:
            pfns = np.arange(dom.npages, dtype=np.uint64)
            round_no = 1
        await self.send(Stop(round_no))
        await self._send_pfns(round_no, pfns)
        await self.lanes.end()
        self.result.mark("last-pages")
        await fault_point("source", "stop-and-copy")
        self.result.iterations = round_no
        blob = await dom.save_state()
        await self.send(VcpuState(dom.config.driver, blob))
        self.result.mark("state-sent")
        if self.opts.verify:
            digest = await asyncio.to_thread(memory_digest, dom.memory(), self._digest_algo)
            await self.send(Digest(self._digest_algo, digest))
        self.committed = True  # from here the target may build a prepared copy
        await self.send(Commit())
        self.result.mark("committed")
        await self.copy.stop_dirty_log()

    async def _expect_prepared(self) -> None:
        await self.progress(phase="prepare")
        answer = await self.channel.recv()
        if isinstance(answer, Abort):
            raise MigrationAborted(f"target aborted: {answer.message}", reason=answer.reason)
        assert isinstance(answer, Prepared)
        self.result.mark("prepared")
        await fault_point("source", "prepared")
        if self.opts.verify and transfer_for(self.domain).verifies_memory:
            self.result.verified = True  # a hypervisor stream's integrity is its driver's to check
        # No journal write here: a restart at STOPPED acts exactly as at
        # PREPARED (roll back, tell the target to drop its copy; ask first if
        # ours is gone), and GO_SENT follows at once.  Older journals may
        # still hold source entries at PREPARED; recovery reads them the same.

    # -- failure before GO -----------------------------------------------------

    async def _abort_before_go(self, exc: BaseException, journaled: bool) -> None:
        reason = exc.reason if isinstance(exc, RelocdError) else Reason.INTERNAL
        msg = exc.message if isinstance(exc, RelocdError) else str(exc)
        self.log.warning("migration aborted before GO", error=msg, reason=reason.name)
        if not isinstance(exc, (PeerGone, MigrationAborted)):
            try:
                async with asyncio.timeout(2):
                    await self.channel.send(Abort(reason, msg[:200]))
            except (RelocdError, OSError, TimeoutError, AssertionError):
                pass
        await self.channel.close()
        await self.copy.roll_back()
        if not journaled:
            return
        if not self.committed or self.reconnect is None:
            self.journal.finish(self.mid, "rolled-back", msg)
            return
        # The target may hold a prepared copy and wait for GO or ABORT that
        # the dead link will never carry: tell it on a new connection.  The
        # journal entry stays open (ABORTED) until the target confirms, so a
        # restart picks the telling up again.
        task = asyncio.get_running_loop().create_task(
            settle_abort(self.journal, self.reconnect, self.mid, f"source gave up: {msg}"),
            name=settling_task_name(self.mid),
        )
        _FOLLOW_UPS.add(task)
        task.add_done_callback(_FOLLOW_UPS.discard)
