"""Operators' control of migrations in flight, through real daemons (issue 12).

A bandwidth cap keeps each migration in precopy for many seconds; each
test waits for the event that shows where it is (a watcher's progress)
before it acts, so nothing depends on a sleep being long enough.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest
from harness import DaemonProc

from relocd.server.control import call
from relocd.errors import RelocdError

SLOW = "4MB/s"  # 64 MiB takes ~16 s: abort, watch and tune have all the time they need


async def names(d: DaemonProc) -> list[tuple[str, str]]:
    return [(x["name"], x["state"]) for x in await d.call("list")]


async def start_slow_migration(a: DaemonProc, b: DaemonProc, name: str) -> tuple[asyncio.Task[Any], asyncio.Queue[dict[str, Any]]]:
    await a.call("create", name=name, memory=64, workload="hotset:size=8MiB,rate=20MB/s")
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(
        call(a.control, "migrate", {"name": name, "host": b.address, "port": b.port, "live": True,
                                    "max_bandwidth": SLOW, "policy": "downtime"}, events.put_nowait)  # fmt: skip
    )
    while True:  # the migration's own events: wait until it streams pages
        event = await asyncio.wait_for(events.get(), 30)
        if event.get("percent") is not None:
            return task, events


async def test_abort_cancels_a_migration_and_leaves_nothing(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    task, _ = await start_slow_migration(a, b, "web")
    answer = await a.call("abort", name="web")
    assert answer["aborted"] == ["web"] and answer["refused"] == {}
    result = await asyncio.wait_for(task, 30)
    assert result["status"] == "cancelled" and result["error"] == "cancelled by the operator"
    assert await names(a) == [("web", "running")]
    assert (await a.call("check", name="web"))["ok"]
    for _ in range(100):  # the target drops its copy when the ABORT arrives
        status = await b.call("status")
        if (await names(b)) == [] and status["reservations"] == 0 and status["in_doubt"] == 0:
            break
        await asyncio.sleep(0.1)
    assert await names(b) == []
    assert (await b.call("status"))["reservations"] == 0
    history = await a.call("history", name="web")
    assert history[0]["kind"] == "migrate" and history[0]["status"] == "cancelled"
    # and the domain moves again afterwards
    result = await a.call("migrate", name="web", host=b.address, port=b.port, live=True)
    assert result["status"] == "completed", result


async def test_job_attaches_from_a_second_client_and_migrate_set_speeds_it_up(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    task, _ = await start_slow_migration(a, b, "db")
    watched: list[dict[str, Any]] = []
    watcher = asyncio.ensure_future(call(a.control, "job", {"name": "db"}, watched.append))
    changed = await a.call("migrate_set", name="db", max_bandwidth="1GB/s", downtime_ms=500)
    assert changed["max_bandwidth"] == 10**9 and changed["downtime_ms"] == 500
    result = await asyncio.wait_for(task, 60)
    seen = await asyncio.wait_for(watcher, 10)
    assert result["status"] == "completed", result
    assert seen == result, "the watcher got another answer than the migration's own"
    assert any(e.get("percent") is not None for e in watched) and all(e.get("domain") == "db" for e in watched)
    assert await names(b) == [("db", "running")]
    assert result["downtime_target_ms"] == 500


async def test_abort_of_nothing_and_job_of_nothing_say_so(host: DaemonProc) -> None:
    with pytest.raises(RelocdError, match="no migration or save of 'ghost' in flight"):
        await host.call("abort", name="ghost")
    with pytest.raises(RelocdError, match="in flight"):
        await host.call("job", name="ghost")
    assert await host.call("abort", all=True) == {"aborted": [], "refused": {}, "results": {}}


async def test_save_is_aborted_before_its_file_is_committed(tmp_path: Any, daemons: list[DaemonProc]) -> None:
    """A checkpoint save held after its first round (RELOCD_FAULT stall): abort leaves no file."""
    d = DaemonProc(tmp_path, "hostA", "127.0.0.1", env={"RELOCD_FAULT": "source:precopy-1:stall"})
    daemons.append(d)
    d.start()
    await d.call("create", name="vm", memory=32, workload="hotset:size=4MiB,rate=10MB/s")
    file = tmp_path / "vm.save"
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(
        call(d.control, "save", {"name": "vm", "file": str(file), "checkpoint": True}, events.put_nowait)
    )
    while True:  # round 1 sent in full: the save now holds at the fault point
        event = await asyncio.wait_for(events.get(), 30)
        if event.get("round") == 1 and event.get("percent") == 100.0:
            break
    assert dict(await names(d))["vm"] == "migrating"
    answer = await d.call("abort", name="vm")
    assert answer["aborted"] == ["vm"] and answer["results"]["vm"]["status"] == "cancelled"
    with pytest.raises(RelocdError, match="cancelled"):
        await task
    assert not file.exists() and list(tmp_path.glob(".vm.save.*")) == []
    assert await names(d) == [("vm", "running")]
    assert (await d.call("check", name="vm"))["ok"]
    assert (await d.call("history", name="vm"))[0]["status"] == "cancelled"


async def test_timeout_abort_through_the_daemon(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    await a.call("create", name="busy", memory=64, workload="uniform:rate=400MB/s")
    result = await a.call("migrate", name="busy", host=b.address, port=b.port, live=True, max_bandwidth="8MB/s",
                          timeout=1.0, timeout_action="abort")  # fmt: skip
    assert result["status"] == "rolled-back" and "did not converge within 1 s" in result["error"]
    assert await names(a) == [("busy", "running")]


async def test_evacuate_spreads_domains_over_two_targets_skipping_one_that_refuses(
    tmp_path: Any, daemons: list[DaemonProc]
) -> None:
    """Three domains, two targets; B refuses anything over 96 MiB (relocd-max-memory): the big one goes to C."""
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2", extra_config="(relocd-max-memory 96M)")
    c = DaemonProc(tmp_path, "hostC", "127.0.0.3")
    daemons.extend([a, b, c])
    for d in (a, b, c):
        d.start()
    await a.call("create", name="big", memory=128)
    await a.call("create", name="small1", memory=32)
    await a.call("create", name="small2", memory=32)
    events: list[dict[str, Any]] = []
    answer = await call(a.control, "evacuate", {"hosts": [f"{b.address}:{b.port}", f"{c.address}:{c.port}"],
                                                "live": True, "parallel": 2}, events.append)  # fmt: skip
    assert sorted(answer["moved"]) == ["big", "small1", "small2"] and answer["failed"] == {}, answer
    assert await names(a) == []
    on_b, on_c = dict(await names(b)), dict(await names(c))
    assert "big" in on_c and "big" not in on_b, (on_b, on_c)
    assert sorted([*on_b, *on_c]) == ["big", "small1", "small2"]
    assert all(state == "running" for state in [*on_b.values(), *on_c.values()])
    assert {e.get("domain") for e in events} >= {"big", "small1", "small2"}


async def test_evacuate_reports_what_could_not_move(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    await a.call("create", name="web", memory=32)
    await b.call("create", name="web", memory=32)  # a clash: B refuses it, and there is no other target
    answer = await a.call("evacuate", hosts=[b.address], port=b.port)
    assert answer["moved"] == [] and "already exists" in answer["failed"]["web"]
    assert await names(a) == [("web", "running")]


async def test_settle_by_hand_when_the_target_is_gone_for_good(tmp_path: Any, daemons: list[DaemonProc]) -> None:
    """B dies at GO and never comes back: A keeps its copy paused and asks; the operator
    settles it (keep-here), and the guard refused while B could still answer."""
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2", env={"RELOCD_FAULT": "target:go:kill"})
    daemons.extend([a, b])
    a.start()
    b.start()
    await a.call("create", name="web", memory=32)
    events: list[dict[str, Any]] = []
    migrating = asyncio.ensure_future(
        call(a.control, "migrate", {"name": "web", "host": b.address, "port": b.port}, events.append)
    )
    for _ in range(300):  # B kills itself on GO; A holds web--migratedaway and keeps asking
        if not b.alive and ("web--migratedaway", "migrating") in await names(a):
            break
        await asyncio.sleep(0.05)
    assert not b.alive
    mid = next(e["migration_id"] for e in events if e.get("migration_id"))
    status = await a.call("status")
    assert status["in_doubt_outgoing"] == 1
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relocd", "settle", mid, "--keep-here", "--control", str(a.control), "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await cli.communicate()
    assert cli.returncode == 0, err.decode()
    answer = json.loads(out)
    assert answer["action"] == "keep-here" and answer["role"] == "source"
    result = await asyncio.wait_for(migrating, 10)
    assert result["status"] == "failed" and "settled by the operator" in result["error"]
    assert await names(a) == [("web", "running")]
    assert (await a.call("check", name="web"))["ok"]
    status = await a.call("status")
    assert status["in_doubt"] == 0 and status["outgoing"] == 0
    with pytest.raises(RelocdError, match="not in doubt"):
        await a.call("settle", migration_id=mid, action="keep-here")


async def test_settle_of_a_finished_migration_is_refused(pair: tuple[DaemonProc, DaemonProc]) -> None:
    """Nothing in doubt, nothing to settle: the operator is told so, and nothing changes."""
    a, b = pair
    await a.call("create", name="web", memory=32)
    result = await a.call("migrate", name="web", host=b.address, port=b.port)
    assert result["status"] == "completed"
    with pytest.raises(RelocdError, match="not in doubt"):
        await a.call("settle", migration_id=result["migration_id"], action="drop-here")


@pytest.mark.parametrize("phase", ["hello", "reserve", "config", "precopy-1", "stop-and-copy", "prepared"])
async def test_abort_at_every_phase_before_go_leaves_nothing(tmp_path: Any, daemons: list[DaemonProc], phase: str) -> None:
    """The source held at each phase before GO (RELOCD_FAULT stall): abort, and neither host keeps anything."""
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1", env={"RELOCD_FAULT": f"source:{phase}:stall"})
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2")
    daemons.extend([a, b])
    a.start()
    b.start()
    await a.call("create", name="web", memory=32, workload="hotset:size=4MiB,rate=10MB/s")
    events: list[dict[str, Any]] = []
    migrating = asyncio.ensure_future(
        call(a.control, "migrate", {"name": "web", "host": b.address, "port": b.port, "live": True}, events.append)
    )

    async def there() -> bool:
        """Has the source reached the phase it stalls at (so the abort lands there, not earlier)?"""
        status = await b.call("status")
        if phase == "hello":
            return True
        if phase in ("reserve", "config"):
            return bool(status["reservations"] == 1)
        if phase == "precopy-1":
            return any(e.get("round") == 1 and e.get("percent") == 100.0 for e in events)
        if phase == "stop-and-copy":
            return any(e.get("phase") == "stop-and-copy" for e in events)
        return bool(status["in_doubt_incoming"] == 1)  # prepared

    for _ in range(600):
        if await there():
            break
        await asyncio.sleep(0.05)
    assert await there(), f"the source never reached {phase}: {events[-3:]}"
    answer = await a.call("abort", name="web")
    assert answer["aborted"] == ["web"], answer
    result = await asyncio.wait_for(migrating, 30)
    assert result["status"] == "cancelled", result
    assert await names(a) == [("web", "running")]
    assert (await a.call("check", name="web"))["ok"]
    for _ in range(200):
        status = await b.call("status")
        if await names(b) == [] and status["reservations"] == 0 and status["in_doubt"] == 0 and status["incoming"] == 0:
            break
        await asyncio.sleep(0.05)
    assert await names(b) == [], await names(b)
    status = await b.call("status")
    assert status["reservations"] == 0 and status["in_doubt"] == 0 and status["incoming"] == 0, status
    for _ in range(200):  # a prepared copy's follow-up (ABORT on a new connection) has confirmed
        if (await a.call("status"))["in_doubt"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await a.call("status"))["in_doubt"] == 0


async def test_relocd_suspend_migrate_mode_moves_first_and_saves_the_rest(
    tmp_path: Any, pair: tuple[DaemonProc, DaemonProc]
) -> None:
    """systemd/relocd-suspend save with RELOCD_MIGRATE_TO: what can move moves, the rest is saved."""
    import os
    from pathlib import Path

    a, b = pair
    await a.call("create", name="web", memory=32)
    await a.call("create", name="db", memory=32)
    await b.call("create", name="db", memory=32)  # B refuses this one: a name clash
    script = Path(__file__).resolve().parents[2] / "systemd" / "relocd-suspend"
    suspend_dir = tmp_path / "suspend"
    env = dict(os.environ, RELOCD=str(Path(sys.executable).with_name("relocd")), RELOCD_CONTROL=str(a.control),
               RELOCD_MIGRATE_TO=f"{b.address}:{b.port}")  # fmt: skip
    proc = await asyncio.create_subprocess_exec("sh", str(script), "save", str(suspend_dir), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (out.decode(), err.decode())
    assert "not every domain could move" in err.decode()
    assert sorted(p.name for p in suspend_dir.glob("*.save")) == ["db.save"]
    assert await names(a) == []
    assert dict(await names(b)) == {"db": "running", "web": "running"}
