"""Three etcd members and three relocd daemons: the cluster store arbitrates handoffs (issue 15).

Skips where Debian's etcd-server is not installed (CI installs it).  Races
are driven by fault points (RELOCD_FAULT), never by sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from harness import DaemonProc  # type: ignore[import-not-found]  # noqa: E402

from relocd.cluster.etcd import EtcdStore  # noqa: E402
from relocd.cluster.ownership import OwnershipRecord, key_of  # noqa: E402
from relocd.errors import RelocdError  # noqa: E402
from tests.system.etcdlab import EtcdCluster, etcd_missing  # noqa: E402

pytestmark = pytest.mark.skipif(etcd_missing() is not None, reason=etcd_missing() or "")

FAST = """(relocd-handshake-timeout 3)
(relocd-reservation-timeout 5)
(relocd-cluster-timeout 1)
"""
SETTLE_S = 40.0


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Fleet:
    def __init__(self, root: Path, etcd: EtcdCluster) -> None:
        self.root = root
        self.etcd = etcd
        self.daemons: dict[str, DaemonProc] = {}

    def daemon(self, name: str, fault: str | None = None, **env: str) -> DaemonProc:
        extra = FAST + f"(relocd-cluster-store '{self.etcd.url}')\n(relocd-cluster-name {name})\n"
        old = self.daemons.get(name)
        d = DaemonProc(self.root, name, "127.0.0.1", port=old.port if old else None, extra_config=extra,
                       env={**({"RELOCD_FAULT": fault} if fault else {}), **env})  # fmt: skip
        self.daemons[name] = d
        return d

    def cleanup(self) -> None:
        for d in self.daemons.values():
            d.cleanup()


@pytest.fixture
def fleet(tmp_path: Path, etcd: EtcdCluster) -> Iterator[Fleet]:
    missing = [n for n in etcd.names if n not in etcd.procs]
    if missing:  # a test that killed members leaves the next one a whole cluster
        etcd.start(missing)
    f = Fleet(tmp_path, etcd)
    try:
        yield f
    finally:
        f.cleanup()


async def call(d: DaemonProc, op: str, **args: Any) -> Any:
    return await asyncio.wait_for(d.call(op, **args), 60)


async def running_on(daemons: list[DaemonProc], uuid: str) -> dict[str, list[str]]:
    """Each live daemon's copies of the domain: name -> [state, ...]."""
    out: dict[str, list[str]] = {}
    for d in daemons:
        if d.alive:
            out[d.name] = [f"{x['name']}:{x['state']}" for x in await call(d, "list") if x["uuid"] == uuid]
    return out


async def settled(daemons: list[DaemonProc], uuid: str, where: str) -> dict[str, list[str]]:
    """Wait until exactly one copy runs, on ``where``, and nothing else holds one."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        seen = await running_on(daemons, uuid)
        here = seen.get(where, [])
        one = len(here) == 1 and here[0].endswith(":running") and "--" not in here[0]
        if one and all(not copies for n, copies in seen.items() if n != where):
            return seen
        if time.monotonic() > deadline:
            pytest.fail(f"not settled on {where}: {seen}")
        await asyncio.sleep(0.2)


async def record(etcd: EtcdCluster, uuid: str) -> OwnershipRecord:
    entry = await EtcdStore(etcd.url).get(key_of(uuid))
    assert entry is not None, "no ownership record"
    return OwnershipRecord.decode(entry.value)


async def start(*daemons: DaemonProc) -> None:
    await asyncio.gather(*(asyncio.to_thread(d.start) for d in daemons))


async def migrate(a: DaemonProc, b: DaemonProc, name: str = "vm") -> dict[str, Any]:
    result: dict[str, Any] = await call(a, "migrate", name=name, host=b.address, port=b.port, live=True, verify=True)
    return result


def test_live_move_with_the_store(fleet: Fleet) -> None:
    async def go() -> None:
        a, b, c = fleet.daemon("a"), fleet.daemon("b"), fleet.daemon("c")
        await start(a, b, c)
        dom = await call(a, "create", name="vm", memory=32, workload="hotset:size=4MiB,rate=20MB/s")
        assert (await record(fleet.etcd, dom["uuid"])).host == "a"
        result = await migrate(a, b)
        assert result["status"] == "completed", result
        await settled([a, b, c], dom["uuid"], "b")
        rec = await record(fleet.etcd, dom["uuid"])
        assert (rec.host, rec.epoch, rec.migration, rec.state) == ("b", 2, result["migration_id"], "taken")
        assert (await call(b, "check", name="vm"))["ok"]
        back = await migrate(b, c)
        assert back["status"] == "completed", back
        assert (await record(fleet.etcd, dom["uuid"])).host == "c"

    asyncio.run(go())


def test_target_gone_for_good_after_go_source_settles_alone(fleet: Fleet) -> None:
    """GO received, then the target dies before its claim: the source fences and resumes, alone."""
    async def go() -> None:
        a, b = fleet.daemon("a"), fleet.daemon("b", fault="target:go:kill")
        await start(a, b)
        dom = await call(a, "create", name="vm", memory=32)
        result = await migrate(a, b)
        assert not b.alive, "the target was not killed at GO"
        assert result["status"] == "rolled-back", result
        assert "fenced in the cluster store" in result["error"]
        await settled([a], dom["uuid"], "a")
        rec = await record(fleet.etcd, dom["uuid"])
        assert rec.host == "a" and result["migration_id"] in rec.fenced
        # The target comes back much later: it finds it lost and drops its prepared copy.
        b2 = fleet.daemon("b")
        await start(b2)
        await settled([a, b2], dom["uuid"], "a")

    asyncio.run(go())


def test_target_killed_after_its_claim_source_lets_go(fleet: Fleet) -> None:
    """The target claimed, then died: the source destroys its copy; the restarted target resumes."""
    async def go() -> None:
        a, b = fleet.daemon("a"), fleet.daemon("b", fault="target:store:claim:done:kill")
        await start(a, b)
        dom = await call(a, "create", name="vm", memory=32)
        result = await migrate(a, b)
        assert not b.alive, "the target was not killed after its claim"
        assert result["status"] == "completed", result
        assert (await running_on([a], dom["uuid"])) == {"a": []}
        rec = await record(fleet.etcd, dom["uuid"])
        assert rec.host == "b" and rec.released
        b2 = fleet.daemon("b")
        await start(b2)  # its journal says RESUMING: it finishes the resume
        await settled([a, b2], dom["uuid"], "b")
        assert (await call(b2, "check", name="vm"))["ok"]

    asyncio.run(go())


class HoldDesk:
    """Answers a daemon held at a crash point (RELOCD_FAULT_HOLD) after running ``act``."""

    def __init__(self, path: Path, act: Any) -> None:
        self.path = path
        self.act = act
        self.held: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            self.held.append(conn.makefile().readline().strip())
            self.act()
            conn.sendall(b"go\n")

    def close(self) -> None:
        self.sock.close()


def test_etcd_member_killed_mid_move_quorum_holds(fleet: Fleet) -> None:
    """The source is held right before its offer while the member it talks to first is killed."""
    etcd = fleet.etcd
    desk = HoldDesk(fleet.root / "hold.sock", lambda: etcd.kill(etcd.names[0]))
    try:
        async def go() -> None:
            a = fleet.daemon("a", fault="source:store:offer:hold", RELOCD_FAULT_HOLD=str(desk.path))
            b = fleet.daemon("b")
            await start(a, b)
            dom = await call(a, "create", name="vm", memory=32)
            result = await migrate(a, b)
            assert desk.held and desk.held[0].startswith("source store:offer"), desk.held
            assert etcd.names[0] not in etcd.procs
            assert result["status"] == "completed", result
            await settled([a, b], dom["uuid"], "b")
            assert (await record(etcd, dom["uuid"])).host == "b"

        asyncio.run(go())
    finally:
        desk.close()


def test_store_unreachable_before_go_keeps_the_domain_here(fleet: Fleet) -> None:
    etcd = fleet.etcd

    async def go() -> None:
        a, b = fleet.daemon("a"), fleet.daemon("b")
        await start(a, b)
        dom = await call(a, "create", name="vm", memory=32)
        for n in etcd.names:
            etcd.kill(n)
        result = await migrate(a, b)
        assert result["status"] == "failed", result
        assert "cluster store unreachable" in result["error"] and "\n" not in result["error"]
        assert "no handoff without it" in result["error"]
        await settled([a, b], dom["uuid"], "a")
        assert await running_on([a], dom["uuid"]) == {"a": ["vm:running"]}
        with pytest.raises(RelocdError, match="cluster store unreachable"):
            await call(a, "create", name="vm2", memory=32)
        assert [x["name"] for x in await call(a, "list")] == ["vm"]  # local reads need no store

    asyncio.run(go())


def test_uuid_created_on_two_hosts_second_is_refused(fleet: Fleet) -> None:
    async def go() -> None:
        a, b = fleet.daemon("a"), fleet.daemon("b")
        await start(a, b)
        uuid = str(uuidlib.uuid4())
        await call(a, "create", name="vm", memory=32, uuid=uuid)
        with pytest.raises(RelocdError, match=f"{uuid} .* is owned by a in the cluster store"):
            await call(b, "create", name="vm", memory=32, uuid=uuid)
        assert await running_on([a, b], uuid) == {"a": ["vm:running"], "b": []}

    asyncio.run(go())


async def wait_for(what: str, check: Any) -> Any:
    """``check()`` (a coroutine) until it returns something true, within SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        await asyncio.sleep(0.2)


def relocd_cli(d: DaemonProc, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relocd", *argv, "--control", str(d.control)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_fleet_evacuate_cluster_save_here_restore_there(fleet: Fleet, tmp_path: Path) -> None:
    """One fleet of three: `cluster hosts|domains` from any host, `evacuate --cluster`, then a
    save on one host restored on another (the record follows), and a destroy that frees the uuid."""
    async def go() -> None:
        a, b, c = fleet.daemon("a"), fleet.daemon("b"), fleet.daemon("c")
        await start(a, b, c)
        big = await call(a, "create", name="big", memory=48)
        small = await call(a, "create", name="small", memory=16)

        async def three() -> list[dict[str, Any]] | None:
            # the module's earlier tests ran daemons of the same names: wait for these ones' keys
            hosts: list[dict[str, Any]] = await call(b, "cluster_hosts")
            ports = {h["name"]: h["port"] for h in hosts}
            return hosts if ports == {"a": a.port, "b": b.port, "c": c.port} else None

        hosts = await wait_for("three hosts registered", three)
        assert [h["self"] for h in hosts] == [False, True, False]
        assert all(h["address"] == "127.0.0.1" and "sim" in h["drivers"] and h["free_bytes"] > 0 for h in hosts)
        ours = {big["uuid"], small["uuid"]}  # the etcd is the module's: earlier tests' records stay
        doms = [d for d in await call(c, "cluster_domains") if d["uuid"] in ours]
        assert {(d["name"], d["host"], d["epoch"], d["state"]) for d in doms} == {("big", "a", 1, "owned"),
                                                                                   ("small", "a", 1, "owned")}
        shown = relocd_cli(c, "cluster", "domains")
        assert shown.returncode == 0 and shown.stderr == ""
        rows = [line.split()[:5] for line in shown.stdout.splitlines()[1:]]
        assert [r for r in rows if r[1] in ours] == [
            ["big", big["uuid"], "a", "1", "owned"], ["small", small["uuid"], "a", "1", "owned"]]

        evac = await call(a, "evacuate", cluster=True, live=True, parallel=2)
        assert sorted(evac["moved"]) == ["big", "small"] and evac["failed"] == {}, evac
        assert {r["target"] for r in evac["results"]} <= {f"127.0.0.1:{b.port}", f"127.0.0.1:{c.port}"}
        assert await running_on([a], big["uuid"]) == {"a": []}
        owners = {d["name"]: d["host"] for d in await call(a, "cluster_domains") if d["uuid"] in ours}
        assert set(owners.values()) <= {"b", "c"}, owners
        there = fleet.daemons[owners["big"]]
        await settled([a, b, c], big["uuid"], there.name)

        file = str(tmp_path / "big.sav")
        saved = await call(there, "save", name="big", file=file)
        assert saved["status"] == "completed" and "warning" not in saved, saved
        assert (await record(fleet.etcd, big["uuid"])).state == "saved"
        await call(a, "restore", file=file)  # another host than the one that saved it
        rec = await record(fleet.etcd, big["uuid"])
        assert (rec.host, rec.epoch, rec.state) == ("a", 3, "owned")  # a -> there (2) -> a (3)
        await settled([a, b, c], big["uuid"], "a")
        with pytest.raises(RelocdError, match="is owned by a in the cluster store"):
            await call(there, "restore", file=file)  # the same file twice: one copy only
        await call(a, "destroy", name="big")
        assert await EtcdStore(fleet.etcd.url).get(key_of(big["uuid"])) is None
        await call(there, "create", name="big", memory=16, uuid=big["uuid"])  # the uuid is free again

    asyncio.run(go())


def test_source_killed_after_its_offer_recovery_fences_the_stale_offer(fleet: Fleet) -> None:
    """The source dies with its offer in the record, before GO: restarted, it rolls back and fences
    that offer, so the prepared target can never claim it; the next move works as usual."""
    async def go() -> None:
        a, b = fleet.daemon("a", fault="source:store:offer:done:kill"), fleet.daemon("b")
        await start(a, b)
        dom = await call(a, "create", name="vm", memory=32)
        with pytest.raises(Exception):
            await migrate(a, b)  # the control socket closes as the daemon dies

        async def dead() -> bool:
            return not a.alive

        await wait_for("the source killed after its offer", dead)
        stale = await record(fleet.etcd, dom["uuid"])
        assert stale.offer is not None and stale.offer not in stale.fenced
        a2 = fleet.daemon("a")
        await start(a2)  # recovery: before GO, rolled back, the offer withdrawn
        rec = await record(fleet.etcd, dom["uuid"])
        assert rec.offer is None and stale.offer in rec.fenced and (rec.host, rec.epoch) == ("a", 1)
        await settled([a2, b], dom["uuid"], "a")
        result = await migrate(a2, b)
        assert result["status"] == "completed", result
        await settled([a2, b], dom["uuid"], "b")

    asyncio.run(go())
