"""Issue 11: the handoff's eight holes, one test each (and a few neighbours).

Each test drives its race to the exact await that mattered, with a gate (an
asyncio.Event) or a fake link, never by sleeping: a source whose GO waits at
a gate, a link lost at a chosen record, a reconnect that fails N times, a
driver whose capabilities() is held, a GO's rename held mid-handoff.  Two
hosts share one process: sim drivers, journals and TargetContexts, joined by
in-memory pipes; a restarted daemon is recovery run on that host's journal,
context and driver (what a daemon runs at startup), see Restarted in
tests/unit/handoff_harness.py, which holds all of that.  Real daemons
(holes 2 and 3) are in tests/daemon/test_exactly_once_daemons.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from relocd.drivers.base import DomainConfig, DomainState
from relocd.engine import source as source_mod
from relocd.engine.journal import Journal, Phase
from relocd.engine.source import new_migration_id
from relocd.engine.stream import MemoryTransport, RecordChannel, memory_pipe
from relocd.engine.target import TargetSession
from relocd.engine.target_resume import outcome_of
from relocd.errors import Reason, RelocdError
from relocd.protocol.records import (
    Abort,
    Done,
    Go,
    Outcome,
    OutcomeState,
    Prepared,
    Refuse,
    Reserved,
    Resumed,
    Role,
)
from relocd.protocol.state import Conversation
from relocd.server import recovery
from tests.unit.fakestream import StreamDriver
from tests.unit.handoff_harness import (  # noqa: F401  (fixtures: hosts, fast_retries)
    A_ADDR,
    B_ADDR,
    B_PEER,
    Dialler,
    fast_retries,
    FastBackoff,
    first_record,
    GoAtGate,
    GoNoticed,
    Host,
    hosts,
    LostAfterPrepared,
    LostWithGo,
    query,
    raw_source,
    reached,
    reserve_request,
    Restarted,
    running_copies,
    settle,
    start_migration,
    WAIT_S,
)


# -- hole 1: a target crash between the resume and RESUMED -------------------------


async def test_hole1_outcome_of_looks_up_a_prepared_copy_missing_from_memory(hosts: tuple[Host, Host]) -> None:
    """PREPARED on disk, the paused copy on the hypervisor, nothing in ctx.in_doubt: still PREPARED."""
    _, b = hosts
    dom = await b.driver.create(DomainConfig(name="vm--incoming", memory_mib=16), start=False)
    mid = new_migration_id()
    b.journal.begin(mid, "target", "vm", dom.config.uuid, A_ADDR, True)
    b.journal.set_phase(mid, Phase.PREPARED)
    assert mid not in b.ctx.in_doubt
    state = outcome_of(b.ctx, mid)
    assert state == OutcomeState.PREPARED, f"a prepared copy that exists answered {state.name}"


async def test_hole1_restarted_target_finishes_a_resume_it_never_journaled(hosts: tuple[Host, Host]) -> None:
    """The old crash window: the target renamed and resumed its copy, then died before RESUMED.

    The target's journal says PREPARED and a renamed, running "vm" is on its
    hypervisor; the source's says GO_SENT and keeps "vm--migratedaway" paused.
    After both restart, the domain must run on exactly one host.
    """
    a, b = hosts
    theirs = await b.driver.create(DomainConfig(name="vm", memory_mib=16))  # renamed and resumed
    ours = await a.driver.create(DomainConfig(name="vm", uuid=theirs.config.uuid, memory_mib=16))
    await ours.pause()
    await ours.rename("vm--migratedaway")
    mid = new_migration_id()
    a.journal.begin(mid, "source", "vm", ours.config.uuid, B_PEER, True)
    a.journal.set_phase(mid, Phase.GO_SENT)
    b.journal.begin(mid, "target", "vm", theirs.config.uuid, A_ADDR, True)
    b.journal.set_phase(mid, Phase.PREPARED)

    restarted_b = b.restarted()
    await restarted_b.recover()
    await settle(restarted_b)
    entry = b.journal.get(mid)
    assert entry is not None and entry.phase != Phase.ABORTED, f"the target journaled {entry}"
    assert outcome_of(b.ctx, mid) != OutcomeState.ABORTED

    dialler = Dialler(b, A_ADDR)
    restarted_a = a.restarted()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recovery, "connect", dialler.connect)
        await restarted_a.recover()
        await settle(restarted_a)
    assert running_copies(a, b) == [("b", "vm")], "the domain must run on exactly one host"
    assert a.journal.get(mid).outcome == "completed"  # type: ignore[union-attr]


async def test_hole1_restarted_target_at_resuming_finishes_the_resume(hosts: tuple[Host, Host]) -> None:
    """RESUMING on disk (GO received), the copy still NAME--incoming and paused: recovery resumes it."""
    _, b = hosts
    dom = await b.driver.create(DomainConfig(name="vm--incoming", memory_mib=16), start=False)
    mid = new_migration_id()
    b.journal.begin(mid, "target", "vm", dom.config.uuid, A_ADDR, True)
    b.journal.set_phase(mid, Phase.PREPARED)
    b.journal.set_phase(mid, Phase.RESUMING)
    restarted = b.restarted()
    await restarted.recover()
    await settle(restarted)
    assert b.listing() == [("vm", "running")]
    assert b.journal.get(mid).phase == Phase.RESUMED  # type: ignore[union-attr]
    assert outcome_of(b.ctx, mid) == OutcomeState.RESUMED


async def test_restarted_target_whose_copy_ran_and_vanished_leaves_it_to_the_operator(hosts: tuple[Host, Host]) -> None:
    """STARTING on disk (the resume was called) and the copy gone with the host's power.

    The copy may have run: the source's paused copy is older than what ran.
    Answering ABORTED (what RESUMING with no copy answers) would have the
    source resume that older state (the handoff model's variant j); the
    entry stays open, QUERY hears RECEIVING, status counts it in doubt.
    """
    _, b = hosts
    dom = await b.driver.create(DomainConfig(name="vm--incoming", memory_mib=16), start=False)
    mid = new_migration_id()
    b.journal.begin(mid, "target", "vm", dom.config.uuid, A_ADDR, True)
    for phase in (Phase.PREPARED, Phase.RESUMING, Phase.STARTING):
        b.journal.set_phase(mid, phase)
    await dom.destroy()  # power lost: the copy is gone
    restarted = b.restarted()
    await restarted.recover()
    await settle(restarted)
    entry = b.journal.get(mid)
    assert entry is not None and not entry.finished and entry.phase == Phase.STARTING
    assert outcome_of(b.ctx, mid) == OutcomeState.RECEIVING
    assert b.ctx.in_doubt_counts()["in_doubt_incoming"] == 1


async def test_restarted_target_at_resuming_with_the_copy_gone_answers_aborted(hosts: tuple[Host, Host]) -> None:
    """RESUMING but not STARTING: the copy never ran here, so the source's copy is the latest."""
    _, b = hosts
    dom = await b.driver.create(DomainConfig(name="vm--incoming", memory_mib=16), start=False)
    mid = new_migration_id()
    b.journal.begin(mid, "target", "vm", dom.config.uuid, A_ADDR, True)
    b.journal.set_phase(mid, Phase.PREPARED)
    b.journal.set_phase(mid, Phase.RESUMING)
    await dom.destroy()
    restarted = b.restarted()
    await restarted.recover()
    await settle(restarted)
    assert outcome_of(b.ctx, mid) == OutcomeState.ABORTED


async def test_hole1_restarted_target_on_a_shared_hypervisor_leaves_the_source_copy_alone(tmp_path: Path) -> None:
    """Two daemons on one hypervisor see each other's domains: same uuid, two copies.

    Both daemons restart with the source's journal at GO_SENT (GO never
    sent) and the target's at PREPARED.  The target's recovery must keep its
    own prepared copy, pv--incoming, for the source to decide; it must not
    take the source's pv--migratedaway (same uuid, no --incoming suffix) for
    a copy it had already renamed, and resume it.
    """
    shared = StreamDriver()
    a, b = Host(tmp_path, "a", shared), Host(tmp_path, "b", shared)
    try:
        await shared.create(DomainConfig(name="pv", memory_mib=1, driver="fakestream"))
        mig, src, task = start_migration(a, b, "pv", GoAtGate)
        assert isinstance(src, GoAtGate)
        await reached("GO journaled, about to be sent", src.at_go.wait())
        task.cancel()  # both daemons die here
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await src.transport.close()
        await reached("the target to notice the lost link", asyncio.gather(*b.sessions))
        by_name = {d.name: d for d in shared.domains()}
        assert sorted(by_name) == ["pv--incoming", "pv--migratedaway"]
        theirs, ours = by_name["pv--incoming"], by_name["pv--migratedaway"]
        touched: list[str] = []

        async def resume() -> None:  # what the source's copy must not be asked
            touched.append("resume")

        ours.resume = resume  # type: ignore[method-assign]
        await b.restarted().recover()
        assert touched == [], "the target's recovery resumed the source's copy"
        assert theirs.name == "pv--incoming" and theirs.state == DomainState.PAUSED
        assert outcome_of(b.ctx, mig.mid) == OutcomeState.PREPARED
    finally:
        for h in (a, b):
            h.journal.close()


# -- hole 3: recovery dials the way the migration was dialled ------------------------


def test_hole3_journal_keeps_the_transport_and_the_name(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    mid = new_migration_id()
    j.begin(mid, "source", "vm", str(uuidlib.uuid4()), "hostB:8003", True, transport="tls", server_name="hostB")
    j.close()
    j = Journal(path)
    try:
        entry = j.get(mid)
        assert entry is not None
        assert (entry.transport, entry.server_name) == ("tls", "hostB")
    finally:
        j.close()


SCHEMA_1 = """
CREATE TABLE migrations (
    migration_id TEXT PRIMARY KEY, role TEXT NOT NULL, domain TEXT NOT NULL, uuid TEXT NOT NULL,
    peer TEXT NOT NULL, live INTEGER NOT NULL, phase TEXT NOT NULL, outcome TEXT, error TEXT,
    started_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL
);
CREATE INDEX migrations_unfinished ON migrations (finished_at);
PRAGMA user_version=1;
"""


def test_hole3_a_schema_1_journal_reads_as_plain_tcp(tmp_path: Path) -> None:
    """A journal written before transports were journaled: its migrations were all plain TCP."""
    path = tmp_path / "journal.sqlite"
    mid = new_migration_id()
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    db.execute(
        "INSERT INTO migrations VALUES (?,?,?,?,?,?,?,NULL,NULL,?,?,NULL)",
        (mid, "source", "vm", str(uuidlib.uuid4()), "10.0.0.2:8002", 1, "go-sent", 1.0, 1.0),
    )
    db.commit()
    db.close()
    j = Journal(path)
    try:
        [entry] = j.unfinished()
        assert entry.migration_id == mid and entry.phase == Phase.GO_SENT
        assert (entry.transport, entry.server_name) == ("plain", None)
        later = new_migration_id()  # and the upgraded journal takes new rows
        j.begin(later, "source", "vm2", str(uuidlib.uuid4()), "h:1", False, transport="tls", server_name="h")
        assert j.get(later).transport == "tls"  # type: ignore[union-attr]
    finally:
        j.close()


async def test_hole3_recovery_dials_tls_with_the_journaled_name(hosts: tuple[Host, Host]) -> None:
    """A TLS migration in doubt after a source restart: the QUERY goes over TLS to the journaled name."""
    a, b = hosts
    theirs = await b.driver.create(DomainConfig(name="vm", memory_mib=16))
    ours = await a.driver.create(DomainConfig(name="vm", uuid=theirs.config.uuid, memory_mib=16))
    await ours.pause()
    await ours.rename("vm--migratedaway")
    mid = new_migration_id()
    a.journal.begin(mid, "source", "vm", ours.config.uuid, "127.0.0.2:8003", True, transport="tls", server_name="hostB")
    a.journal.set_phase(mid, Phase.GO_SENT)
    b.journal.begin(mid, "target", "vm", theirs.config.uuid, A_ADDR, True)
    b.journal.set_phase(mid, Phase.PREPARED)
    b.journal.set_phase(mid, Phase.RESUMED)  # it runs there; the link dropped before DONE

    dialler = Dialler(b, A_ADDR)

    async def plain(host: str, port: int, timeout: float | None = None) -> MemoryTransport:
        dialler.dialled.append(("plain", host, port))
        raise ConnectionResetError("a TLS port answers no plain relocd preamble")

    restarted = a.restarted()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recovery, "connect", plain)
        mp.setattr(recovery, "connect_tls", dialler.connect_tls, raising=False)
        mp.setattr(recovery, "client_context", lambda settings: object(), raising=False)
        await restarted.recover()
        await settle(restarted)
    assert dialler.dialled == [("tls", "hostB", 8003)]
    assert a.journal.get(mid).outcome == "completed"  # type: ignore[union-attr]
    assert a.listing() == []


# -- hole 4: a rollback's "drop your copy" and an in-doubt source never give up ----------


async def test_hole4_rollback_after_commit_asks_until_the_target_drops_its_copy(
    hosts: tuple[Host, Host], fast_retries: None
) -> None:
    """The link dies as PREPARED arrives: the target holds a prepared copy the source will never GO.

    The source resumes its own and must see the target's dropped: the
    journal entry stays open (ABORTED, counted in doubt) while the target
    cannot be reached, however long that takes, and closes on confirmation.
    """
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    dialler = Dialler(b, "a", fail_first=2, hold_at=3)
    # recovery_s=0: before the fix it bounded the telling; a deadline already passed
    mig, _, task = start_migration(a, b, "vm", LostAfterPrepared, recovery_s=0.0, reconnect=dialler)
    result = await reached("the migration's rollback", task)
    assert result.status == "rolled-back", result
    assert a.listing() == [("vm", "running")]
    entry = a.journal.get(mig.mid)
    assert entry is not None and not entry.finished and entry.phase == Phase.ABORTED, (
        f"source entry closed before the target confirmed it holds no copy: {entry}"
    )
    await reached("a third connection attempt after two refused ones", dialler.held.wait())
    status = await a.restarted().status()
    assert status["in_doubt_outgoing"] == 1, status
    assert b.listing() == [("vm--incoming", "paused")]
    dialler.gate.set()
    await reached("the follow-up to end", asyncio.gather(*list(source_mod._FOLLOW_UPS)))
    entry = a.journal.get(mig.mid)
    assert entry is not None and entry.outcome == "rolled-back", entry
    assert b.listing() == [] and b.ctx.in_doubt == {} and b.ctx.reservations.all() == []
    assert b.journal.get(mig.mid).outcome == "rolled-back"  # type: ignore[union-attr]
    assert dialler.calls >= 4, "the drop is confirmed by asking again, not by sending ABORT"


async def test_hole4_source_asks_past_recovery_s_after_go(hosts: tuple[Host, Host], fast_retries: None) -> None:
    """GO journaled, the link lost with it; the target stays unreachable beyond recovery_s.

    The operator hears 'in doubt' (in_doubt_notice) but the migration asks
    on, and ends when the target answers.
    """
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    dialler = Dialler(b, "a", fail_first=3)
    mig, _, task = start_migration(a, b, "vm", LostWithGo, recovery_s=0.0, reconnect=dialler)
    notice: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    mig.in_doubt_notice = notice
    result = await reached("the migration to end", task)
    assert result.status == "completed", f"gave up: {result.status}: {result.error}"
    assert notice.done() and "in doubt" in (notice.result().error or ""), "the operator was not told"
    assert dialler.calls == 4
    assert running_copies(a, b) == [("b", "vm")]
    assert a.journal.get(mig.mid).outcome == "completed"  # type: ignore[union-attr]


async def test_hole4_restart_at_aborted_goes_on_telling_the_target(hosts: tuple[Host, Host], fast_retries: None) -> None:
    """The source dies while telling the target to drop its copy: the restarted one tells it."""
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    unreachable = Dialler(b, "a", hold_at=1)  # the first attempt never connects
    mig, _, task = start_migration(a, b, "vm", LostAfterPrepared, recovery_s=0.0, reconnect=unreachable)
    assert (await reached("the migration's rollback", task)).status == "rolled-back"
    await reached("the follow-up's first attempt", unreachable.held.wait())
    follow_ups = list(source_mod._FOLLOW_UPS)
    for t in follow_ups:  # the source host dies here
        t.cancel()
    await asyncio.gather(*follow_ups, return_exceptions=True)
    entry = a.journal.get(mig.mid)
    assert entry is not None and not entry.finished and entry.phase == Phase.ABORTED, (
        f"source entry closed before the target confirmed it holds no copy: {entry}"
    )
    assert b.listing() == [("vm--incoming", "paused")]
    dialler = Dialler(b, "a", fail_first=2)
    restarted = a.restarted()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recovery, "connect", dialler.connect)
        await restarted.recover()
        await settle(restarted)
    assert b.listing() == [] and b.ctx.in_doubt == {} and b.ctx.reservations.all() == []
    assert a.journal.get(mig.mid).outcome == "rolled-back"  # type: ignore[union-attr]
    assert a.listing() == [("vm", "running")]
    assert dialler.calls >= 4


# -- hole 5: a source restarted after GO without its copy -------------------------------


async def test_hole5_source_without_its_copy_sends_go_to_the_prepared_one(hosts: tuple[Host, Host]) -> None:
    """Host A loses power with GO journaled but never sent; its copy is gone at restart.

    The target's prepared copy is the only one left: the restarted source
    must ask, find PREPARED and send GO, not close the entry and walk away.
    """
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    mig, src, task = start_migration(a, b, "vm", GoAtGate)
    assert isinstance(src, GoAtGate)
    await reached("GO journaled, about to be sent", src.at_go.wait())
    task.cancel()  # power lost: nothing after this point runs on A
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await src.transport.close()
    local = a.driver.lookup("vm--migratedaway")
    assert local is not None
    await local.destroy()
    assert a.journal.get(mig.mid).phase == Phase.GO_SENT  # type: ignore[union-attr]
    await reached("the target to notice the lost link", asyncio.gather(*b.sessions))
    assert b.listing() == [("vm--incoming", "paused")]

    dialler = Dialler(b, "a")
    restarted = a.restarted()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recovery, "connect", dialler.connect)
        await restarted.recover()
        await settle(restarted)
    assert b.listing() == [("vm", "running")], "the target's prepared copy, the only one, never resumed"
    assert dialler.calls >= 1
    assert a.journal.get(mig.mid).outcome == "completed"  # type: ignore[union-attr]
    assert b.journal.get(mig.mid).phase == Phase.RESUMED  # type: ignore[union-attr]


class HoldAtPrepared(RecordChannel):
    """The source's channel: PREPARED arrives and the source never gets to act on it (power lost)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared = asyncio.Event()

    async def recv(self) -> Any:
        record = await super().recv()
        if isinstance(record, Prepared):
            self.prepared.set()
            await asyncio.Event().wait()  # the host is dead from here
        return record


async def test_hole5_source_lost_before_go_sends_go_to_the_only_copy(hosts: tuple[Host, Host]) -> None:
    """Host A loses power after COMMIT, before GO: its journal says STOPPED, its copy is gone.

    Its copy never ran after the pause (a rollback journals ABORTED first),
    so the target's prepared copy is the latest state and the only copy: the
    restarted source must send it GO, not tell it to drop it (the model found
    this: the domain was lost).
    """
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    mig, src, task = start_migration(a, b, "vm", HoldAtPrepared)
    assert isinstance(src, HoldAtPrepared)
    await reached("PREPARED at the source", src.prepared.wait())
    local = a.driver.lookup("vm")
    assert local is not None
    await local.destroy()  # power lost: the domain process is gone with the host
    assert a.journal.get(mig.mid).phase == Phase.STOPPED  # type: ignore[union-attr]
    await src.transport.close()
    await reached("the target to notice the lost link", asyncio.gather(*b.sessions))
    assert b.listing() == [("vm--incoming", "paused")]

    dialler = Dialler(b, "a")
    restarted = a.restarted()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recovery, "connect", dialler.connect)
        await restarted.recover()
        await settle(restarted)
    assert b.listing() == [("vm", "running")], "the only copy left was dropped or never resumed"
    assert a.journal.get(mig.mid).outcome == "completed"  # type: ignore[union-attr]
    task.cancel()  # the dead host's task, for the test's own cleanup
    await asyncio.gather(task, return_exceptions=True)


# -- hole 6: a migration belongs to the peer that reserved it ---------------------------


async def test_hole6_query_from_another_peer_learns_nothing_and_decides_nothing(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    mig, src, task = start_migration(a, b, "vm", GoAtGate)
    assert isinstance(src, GoAtGate)
    await reached("the target at PREPARED", src.at_go.wait())
    intruder = b.serve("10.6.6.6")
    got = await first_record_of_query(intruder, mig.mid)
    with contextlib.suppress(RelocdError, OSError):
        await intruder.send(Abort(Reason.CANCELLED, "drop it"))
    await intruder.close()
    await reached("the intruder's session to end", b.sessions[-1])
    assert not isinstance(got, Outcome), f"another peer was told {got}"
    assert mig.mid in b.ctx.in_doubt and b.listing() == [("vm--incoming", "paused")]
    entry = b.journal.get(mig.mid)
    assert entry is not None and entry.phase == Phase.PREPARED and not entry.finished
    src.gate.set()  # the real source is unaffected
    result = await reached("the migration to end", task)
    assert result.status == "completed", result
    assert running_copies(a, b) == [("b", "vm")]


async def first_record_of_query(channel: RecordChannel, mid: str) -> object:
    try:
        return await query(channel, mid)
    except (RelocdError, OSError) as exc:
        return exc


async def test_hole6_query_under_another_certificate_is_refused(hosts: tuple[Host, Host]) -> None:
    """Same address, another TLS identity: refused as well."""
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    mig, src, task = start_migration(a, b, "vm", GoAtGate, session={"peer_identity": "CN=hostA"})
    assert isinstance(src, GoAtGate)
    await reached("the target at PREPARED", src.at_go.wait())
    assert b.journal.get(mig.mid).peer_identity == "CN=hostA"  # type: ignore[union-attr]
    got = await first_record_of_query(b.serve("a", peer_identity="CN=hostC"), mig.mid)
    assert not isinstance(got, Outcome), f"another certificate was told {got}"
    owner = b.serve("a", peer_identity="CN=hostA")
    got = await first_record_of_query(owner, mig.mid)
    await owner.close()
    assert isinstance(got, Outcome) and got.state == OutcomeState.PREPARED, got
    src.gate.set()
    assert (await reached("the migration to end", task)).status == "completed"


async def test_hole6_hello_reusing_a_live_migration_id_leaves_it_alone(hosts: tuple[Host, Host]) -> None:
    """A second HELLO(SOURCE) with an id already in flight: refused, the first one untouched."""
    _, b = hosts
    mid = new_migration_id()
    first = await raw_source(b, "a", mid, reserve_request("first"))
    assert isinstance(await first.recv(), Reserved)
    before = b.journal.get(mid)
    assert before is not None and before.phase == Phase.RECEIVING
    second = await raw_source(b, "a", mid, reserve_request("second"))
    answer = await first_record(second)
    await second.close()
    await reached("the second session to end", b.sessions[-1])
    assert not isinstance(answer, Reserved), answer
    after = b.journal.get(mid)
    assert after == before, f"the live migration's entry was touched: {after}"
    assert b.ctx.reservations.get(mid) is not None, "the live migration's reservation was released"
    assert mid in b.ctx.incoming and b.listing() == [("first--incoming", "paused")]
    await first.close()


# -- hole 7: max-incoming across the capabilities() await ----------------------------


async def test_hole7_max_incoming_holds_while_capabilities_is_awaited(
    hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b = hosts
    real = b.driver.capabilities
    inside = 0
    both_inside = asyncio.Event()
    release = asyncio.Event()

    async def held_capabilities() -> Any:
        nonlocal inside
        inside += 1
        if inside == 2:
            both_inside.set()
        await release.wait()
        return await real()

    monkeypatch.setattr(b.driver, "capabilities", held_capabilities)
    one = await raw_source(b, "a", new_migration_id(), reserve_request("one"), max_incoming=1)
    two = await raw_source(b, "a", new_migration_id(), reserve_request("two"), max_incoming=1)
    await reached("both RESERVEs inside capabilities()", both_inside.wait())
    release.set()
    answers = [await first_record(one), await first_record(two)]
    granted = [x for x in answers if isinstance(x, Reserved)]
    refused = [x for x in answers if isinstance(x, Refuse)]
    assert len(granted) == 1, f"max-incoming 1, {len(granted)} reservations granted: {answers}"
    assert len(refused) == 1 and "too many incoming migrations" in refused[0].message, answers
    assert len(b.ctx.reservations.all()) == 1
    await one.close()
    await two.close()


# -- hole 8: a second GO while the first is being acted on ------------------------------


async def test_hole8_a_second_go_waits_for_the_first_resume(hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """A QUERY answered PREPARED just before the real GO lands, its own GO arriving mid-handoff.

    The first GO's rename is held at a gate, so the second GO finds the copy
    exactly as the first left it.  The domain resumes once and both GOs hear
    RESUMED(ok); a QUERY asked meanwhile hears RECEIVING (ask again), not PREPARED.
    """
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    mig, src, task = start_migration(a, b, "vm", GoAtGate)
    assert isinstance(src, GoAtGate)
    await reached("the target at PREPARED", src.at_go.wait())
    copy = b.ctx.in_doubt[mig.mid]
    renaming = asyncio.Event()
    release = asyncio.Event()
    resumes = 0
    real_rename, real_resume = copy.rename, copy.resume

    async def held_rename(name: str) -> None:
        renaming.set()
        await release.wait()
        await real_rename(name)

    async def counted_resume() -> None:
        nonlocal resumes
        resumes += 1
        await real_resume()

    monkeypatch.setattr(copy, "rename", held_rename)
    monkeypatch.setattr(copy, "resume", counted_resume)
    # A retrying QUERY, answered before the GO arrives: PREPARED, and its session waits for a decision.
    ours, theirs = memory_pipe()
    retry_target = GoNoticed(theirs, Conversation(Role.TARGET), max_frame=16 << 20)
    b.sessions.append(asyncio.ensure_future(TargetSession(retry_target, b.ctx, peer="a").run()))
    retry = RecordChannel(ours, Conversation(Role.QUERY), max_frame=16 << 20)
    first = await query(retry, mig.mid)
    assert isinstance(first, Outcome) and first.state == OutcomeState.PREPARED, first
    src.gate.set()  # the real GO: its rename holds
    await reached("the first GO's rename", renaming.wait())
    asked_late = b.serve("a")
    late = await first_record_of_query(asked_late, mig.mid)
    await asked_late.close()
    await retry.send(Go())
    await reached("the retry's GO at the target", retry_target.got_go.wait())
    release.set()
    retry_answer = await reached("RESUMED on the retry", first_record(retry))
    with contextlib.suppress(RelocdError, OSError):
        await retry.send(Done())
    result = await reached("the migration to end", task)
    await reached("the target's sessions to end", asyncio.gather(*b.sessions, return_exceptions=True))
    assert resumes == 1, f"resumed {resumes} times"
    assert isinstance(late, Outcome) and late.state == OutcomeState.RECEIVING, f"a QUERY during the resume got {late}"
    assert isinstance(retry_answer, Resumed) and retry_answer.ok, retry_answer
    assert result.status == "completed", result
    assert running_copies(a, b) == [("b", "vm")]
    entry = b.journal.get(mig.mid)
    assert entry is not None and entry.phase == Phase.RESUMED and entry.outcome == "completed", entry
