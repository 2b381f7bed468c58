"""The fleet from any host (`relocd cluster hosts|domains`, `evacuate --cluster`) on an in-memory store.

A real Operations on a sim driver and a real control socket: the commands
as an operator runs them, the store faked (tests/unit/fakestore.py).
The same commands against real etcd: tests/system/test_etcd_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from relocd import cli
from relocd.cli.tables import format_cluster_domains, format_cluster_hosts
from relocd.cluster.handoff import withdraw_offer
from relocd.cluster.ownership import Ownership, OwnershipRecord, key_of
from relocd.cluster.registry import LEASE_TTL_S, fit_targets, host_info, keep_registered, pick_target
from relocd.cluster.store import HOSTS
from relocd.config.settings import Settings
from relocd.drivers.sim import SimDriver
from relocd.engine.host import Host
from relocd.engine.journal import Journal
from relocd.engine.reservation import ReservationTable
from relocd.errors import DomainExists, RelocdError
from relocd.server import evacuate, saveops
from relocd.server.control import ControlServer, NullSink
from relocd.server.operations import Operations

from tests.unit.fakestore import MemoryStore

MIB = 1 << 20


def registered(name: str, free_mib: int, drivers: list[str], port: int | None = 8002, **extra: Any) -> dict[str, Any]:
    return {"name": name, "address": f"10.0.0.{ord(name[-1]) % 200}", "port": port, "ssl_port": 8003,
            "free_bytes": free_mib * MIB, "drivers": drivers, "domains": 0, "version": "1.0", **extra}


class Fleet:
    """Host ``a`` (a sim driver, an Operations) and what the store holds of others."""

    def __init__(self, root: Path, store: MemoryStore | None, me: str = "a") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.driver = SimDriver(root / "sim")
        self.host = Host(
            drivers={"sim": self.driver}, reservations=ReservationTable(30.0), journal=Journal(root / "journal.sqlite"),
            cluster=Ownership(store, me) if store is not None else None,
        )  # fmt: skip
        self.ops = Operations(self.host, Settings(state_dir=root / "state"), lambda: [])

    def register(self, doc: dict[str, Any]) -> None:
        """What ``keep_registered`` puts under the host's lease."""
        assert self.store is not None
        self.store._write(HOSTS + doc["name"], json.dumps(doc).encode(), 0)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="rcf", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def fleet_at(root: Path, store: MemoryStore | None, me: str = "a") -> Fleet:
    f = Fleet(root, store, me)
    await f.driver.start()
    return f


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = await fleet_at(tmp_path, MemoryStore())
    try:
        yield f
    finally:
        await close(f)


async def close(f: Fleet) -> None:
    for d in f.driver.domains():
        await d.destroy()
    await f.driver.close()
    f.host.journal.close()


async def serve(f: Fleet, sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> ControlServer:
    monkeypatch.setenv("RELOCD_CONTROL", str(sock_dir / "control.sock"))
    server = ControlServer(sock_dir / "control.sock", f.ops.handlers())
    await server.start()
    return server


async def relocd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- relocd cluster hosts | domains -------------------------------------------------------


async def test_cluster_hosts_and_domains_from_the_store(
    fleet: Fleet, sock_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.register(registered("a", 4096, ["sim"]))
    fleet.register(registered("b", 8192, ["kvm", "sim"], port=None))
    with structlog.testing.capture_logs():
        dom = await fleet.ops.create({"name": "web1", "memory": 16, "driver": "sim"}, NullSink())
        server = await serve(fleet, sock_dir, monkeypatch)
        try:
            code, out, err = await relocd(capsys, "cluster", "hosts")
            assert (code, err) == (0, "")
            lines = out.splitlines()
            assert lines[0].split() == ["Host", "Address", "Port", "SSL", "Free", "Domains", "Drivers", "Version"]
            assert lines[1].startswith("a *") and "4.0 GiB" in lines[1] and lines[1].split()[-2:] == ["sim", "1.0"]
            assert lines[2].startswith("b ") and " - " in lines[2] and "kvm,sim" in lines[2]  # no plain port
            code, out, _ = await relocd(capsys, "cluster", "hosts", "--json")
            assert code == 0 and [(h["name"], h["self"]) for h in json.loads(out)] == [("a", True), ("b", False)]
            code, out, err = await relocd(capsys, "cluster", "domains", "--json")
            assert (code, err) == (0, "")
            assert json.loads(out) == [{"uuid": dom["uuid"], "name": "web1", "host": "a", "epoch": 1,
                                        "state": "owned", "migration": None}]  # fmt: skip
            code, out, _ = await relocd(capsys, "cluster", "domains")
            assert out.splitlines()[0].split() == ["Name", "UUID", "Owner", "Epoch", "State", "Last", "migration"]
            assert out.splitlines()[1].split() == ["web1", dom["uuid"], "a", "1", "owned", "-"]
        finally:
            await server.close()


async def test_cluster_without_a_store_or_with_it_down_is_one_line(
    tmp_path: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = await fleet_at(tmp_path / "bare", None)
    with structlog.testing.capture_logs():
        server = await serve(bare, sock_dir, monkeypatch)
        try:
            code, out, err = await relocd(capsys, "cluster", "domains")
            assert (code, out) == (1, "")
            assert err == "relocd: no cluster store configured on this host (set relocd-cluster-store; docs/cluster.md)\n"
        finally:
            await server.close()
            await close(bare)
        down = await fleet_at(tmp_path / "down", MemoryStore())
        assert down.store is not None
        down.store.down = True
        server = await serve(down, sock_dir, monkeypatch)
        try:
            for what in ("hosts", "domains"):
                code, out, err = await relocd(capsys, "cluster", what)
                assert (code, out) == (1, "")
                assert err == "relocd: cluster store unreachable (memory://): down\n"
        finally:
            await server.close()
            await close(down)


def test_tables_show_what_is_missing_as_a_dash() -> None:
    hosts = format_cluster_hosts([{"name": "x"}]).splitlines()
    assert hosts[1].split() == ["x", "-", "-", "-", "-", "-", "-", "-"]
    doms = format_cluster_domains([{"uuid": "u", "host": "h", "epoch": 3, "state": "fenced", "migration": "m"}])
    assert doms.splitlines()[1].split() == ["-", "u", "h", "3", "fenced", "m"]


# -- evacuate --cluster -------------------------------------------------------------------


def test_fit_targets_by_driver_room_and_port_never_us() -> None:
    hosts = [registered("a", 64, ["sim"]), registered("b", 2, ["sim"]), registered("c", 8, ["kvm"]),
             registered("d", 16, ["sim"]), registered("e", 32, ["sim"], port=None)]  # fmt: skip
    assert [h["name"] for h in fit_targets(hosts, "a", MIB, "sim")] == ["d", "b"]
    assert [h["name"] for h in fit_targets(hosts, "a", 4 * MIB, "sim")] == ["d"]
    assert [h["name"] for h in fit_targets(hosts, "a", MIB, "sim", tls=True)] == ["e", "d", "b"]
    assert (pick_target(hosts, "a", MIB, "kvm") or {}).get("name") == "c"
    assert pick_target(hosts, "d", 64 * MIB, "sim") is not None and pick_target(hosts, "a", 64 * MIB, "sim") is None


async def test_evacuate_cluster_picks_registered_hosts(fleet: Fleet) -> None:
    fleet.register(registered("a", 6400, ["sim"]))  # ourselves: never a target
    fleet.register(registered("b", 100, ["sim"]))  # too small for big
    fleet.register(registered("c", 400, ["sim"]))
    fleet.register(registered("d", 800, ["kvm"]))  # not our driver
    calls: list[dict[str, Any]] = []

    async def migrate(args: dict[str, Any], sink: Any) -> dict[str, Any]:
        calls.append(args)
        return {"status": "completed", "domain": args["name"], "target": f"{args['host']}:{args['port']}"}

    with structlog.testing.capture_logs():
        await fleet.ops.create({"name": "big", "memory": 200, "driver": "sim"}, NullSink())
        await fleet.ops.create({"name": "small", "memory": 16, "driver": "sim"}, NullSink())
        result = await evacuate.evacuate(fleet.host, migrate, set(), {"cluster": True, "live": True}, NullSink())
    assert sorted(result["moved"]) == ["big", "small"] and result["failed"] == {}
    where = {c["name"]: (c["host"], c["port"], c["ssl"]) for c in calls}
    assert where["big"] == ("10.0.0.99", 8002, False)  # c: the only one with room for 200 MiB
    assert where["small"] in {("10.0.0.99", 8002, False), ("10.0.0.98", 8002, False)}
    assert all(c["host"] not in ("10.0.0.97", "10.0.0.100") for c in calls)  # never a, never d


async def test_evacuate_cluster_tries_the_next_fit_and_refuses_without_one(fleet: Fleet) -> None:
    fleet.register(registered("b", 100, ["sim"]))
    fleet.register(registered("c", 400, ["sim"]))
    tried: list[str] = []

    async def migrate(args: dict[str, Any], sink: Any) -> dict[str, Any]:
        tried.append(args["host"])
        ok = args["host"] == "10.0.0.98"
        return {"status": "completed" if ok else "failed", "domain": args["name"], "error": None if ok else "full"}

    with structlog.testing.capture_logs():
        await fleet.ops.create({"name": "web", "memory": 16, "driver": "sim"}, NullSink())
        result = await evacuate.evacuate(fleet.host, migrate, set(), {"cluster": True, "ssl": None}, NullSink())
        assert result["moved"] == ["web"] and tried == ["10.0.0.99", "10.0.0.98"]  # roomiest first, then the next
        await fleet.ops.destroy({"name": "web"}, NullSink())
        await fleet.ops.create({"name": "huge", "memory": 512, "driver": "sim"}, NullSink())
        tried.clear()
        result = await evacuate.evacuate(fleet.host, migrate, set(), {"cluster": True}, NullSink())
    assert result["moved"] == [] and tried == []
    assert result["failed"] == {"huge": "no other registered host runs sim with 512 MiB free"}


async def test_evacuate_cluster_needs_a_store_and_no_hosts(tmp_path: Path) -> None:
    bare = await fleet_at(tmp_path, None)

    async def migrate(args: dict[str, Any], sink: Any) -> dict[str, Any]:
        raise AssertionError("nothing may move")

    try:
        with pytest.raises(Exception, match="evacuate --cluster needs a cluster store"):
            await evacuate.evacuate(bare.host, migrate, set(), {"cluster": True}, NullSink())
        with pytest.raises(Exception, match="not both"):
            await evacuate.evacuate(bare.host, migrate, set(), {"cluster": True, "hosts": ["b"]}, NullSink())
    finally:
        await close(bare)


@pytest.mark.parametrize("argv", [["evacuate"], ["evacuate", "hostb", "--cluster"]])
def test_evacuate_cli_wants_hosts_or_cluster(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        "relocd: evacuate: name target hosts, or --cluster for the cluster store's (not both)\n"
    )


# -- destroy, save, restore ---------------------------------------------------------------


def owner(store: MemoryStore, uuid: str) -> OwnershipRecord | None:
    entry = store.data.get(key_of(uuid))
    return OwnershipRecord.decode(entry.value) if entry else None


async def test_destroy_deletes_our_record_and_a_store_down_is_a_warning(fleet: Fleet) -> None:
    store = fleet.store
    assert store is not None
    with structlog.testing.capture_logs():
        dom = await fleet.ops.create({"name": "web", "memory": 16, "driver": "sim"}, NullSink())
        assert owner(store, dom["uuid"]) is not None
        assert await fleet.ops.destroy({"name": "web"}, NullSink()) == {"name": "web"}
        assert owner(store, dom["uuid"]) is None  # the uuid is free in the fleet again
        dom = await fleet.ops.create({"name": "web", "memory": 16, "driver": "sim"}, NullSink())
        store.down = True
        result = await fleet.ops.destroy({"name": "web"}, NullSink())
    assert fleet.driver.domains() == []  # destroyed all the same
    assert result["warning"].startswith("cluster store unreachable (memory://): down; the ownership record still names a")
    store.down = False
    assert (owner(store, dom["uuid"]) or OwnershipRecord("?", 0)).host == "a"


async def test_saved_here_restored_there_once(tmp_path: Path) -> None:
    store = MemoryStore()
    a, b = await fleet_at(tmp_path / "a", store, "a"), await fleet_at(tmp_path / "b", store, "b")
    file = str(tmp_path / "web.sav")
    try:
        with structlog.testing.capture_logs():
            dom = await a.ops.create({"name": "web", "memory": 16, "driver": "sim"}, NullSink())
            checkpoint = await saveops.save(a.host, a.ops.settings, {"name": "web", "file": file, "checkpoint": True},
                                            NullSink())  # fmt: skip
            assert checkpoint["status"] == "completed"
            assert (owner(store, dom["uuid"]) or OwnershipRecord("?", 0)).state == "owned"  # -c: still runs on a
            with pytest.raises(DomainExists, match="is owned by a in the cluster store"):
                await saveops.restore(b.host, b.ops.settings, {"file": file}, NullSink())
            saved = await saveops.save(a.host, a.ops.settings, {"name": "web", "file": file}, NullSink())
            assert saved["status"] == "completed" and "warning" not in saved
            rec = owner(store, dom["uuid"])
            assert rec is not None and (rec.host, rec.state) == ("a", "saved")
            await saveops.restore(b.host, b.ops.settings, {"file": file}, NullSink())
            rec = owner(store, dom["uuid"])
            assert rec is not None and (rec.host, rec.epoch, rec.state) == ("b", 2, "owned")
            assert [d.name for d in b.driver.domains()] == ["web"]
            with pytest.raises(DomainExists, match="is owned by b in the cluster store"):
                await saveops.restore(a.host, a.ops.settings, {"file": file}, NullSink())  # never two copies
            assert a.driver.domains() == []
    finally:
        await close(a)
        await close(b)


async def test_a_failed_restore_leaves_the_record_saved(tmp_path: Path) -> None:
    store = MemoryStore()
    a, b = await fleet_at(tmp_path / "a", store, "a"), await fleet_at(tmp_path / "b", store, "b")
    file = tmp_path / "web.sav"
    try:
        with structlog.testing.capture_logs():
            dom = await a.ops.create({"name": "web", "memory": 16, "driver": "sim"}, NullSink())
            await saveops.save(a.host, a.ops.settings, {"name": "web", "file": str(file)}, NullSink())
            raw = bytearray(file.read_bytes())
            raw[-200] ^= 0xFF  # a corrupt trailer: the restore fails after its claim
            file.write_bytes(bytes(raw))
            with pytest.raises(RelocdError):
                await saveops.restore(b.host, b.ops.settings, {"file": str(file)}, NullSink())
            assert b.driver.domains() == []
            rec = owner(store, dom["uuid"])
            assert rec is not None and (rec.host, rec.state) == ("b", "saved")  # any host may try again
    finally:
        await close(a)
        await close(b)


async def test_a_migration_over_with_our_copy_here_fences_its_offer(fleet: Fleet) -> None:
    own, store = fleet.host.cluster, fleet.store
    assert own is not None and store is not None
    with structlog.testing.capture_logs():
        dom = await fleet.ops.create({"name": "web", "memory": 16, "driver": "sim"}, NullSink())
        await own.offer(dom["uuid"], "web", "m1")
        assert await withdraw_offer(fleet.host, dom["uuid"], "m1") is True
        rec = owner(store, dom["uuid"])
        assert rec is not None and rec.offer is None and "m1" in rec.fenced
        await own.offer(dom["uuid"], "web", "m2")
        store.down = True
        assert await withdraw_offer(fleet.host, dom["uuid"], "m2") is False  # logged; the next offer fences it
        store.down = False
        await fleet.ops.destroy({"name": "web"}, NullSink())
        assert await withdraw_offer(fleet.host, dom["uuid"], "m2") is False  # no copy here: not ours to fence


# -- the registry: this daemon under a lease it keeps alive ------------------------------


class Watched(MemoryStore):
    """Tells a test each time a host key is written (the registry's rounds)."""

    def __init__(self) -> None:
        super().__init__()
        self.puts: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> None:
        await super().put(key, value, lease=lease)
        self.puts.put_nowait((key, lease))


async def next_put(store: Watched) -> tuple[str, int]:
    return await asyncio.wait_for(store.puts.get(), 10)


async def test_registration_lives_under_a_lease_renewed_and_granted_again(tmp_path: Path) -> None:
    store = Watched()
    f = await fleet_at(tmp_path, store, "a")
    settings = Settings(state_dir=tmp_path / "state", relocation_address="0.0.0.0", relocation_server=True)
    task = asyncio.ensure_future(keep_registered(f.host, settings, lambda: ["0.0.0.0:8002"], period_s=0.01))
    try:
        with structlog.testing.capture_logs() as logs:
            key, lease = await next_put(store)
            assert key == HOSTS + "a" and lease in store.leases and HOSTS + "a" in store.leases[lease]
            doc = json.loads(store.data[key].value)
            assert doc["name"] == "a" and doc["drivers"] == ["sim"] and doc["port"] == settings.relocation_port
            assert doc["address"] not in ("", "0.0.0.0") and doc["ssl_port"] is None and doc["free_bytes"] > 0
            assert (await next_put(store))[1] == lease  # renewed: the same lease
            store.expire(lease)  # etcd let it lapse (the daemon was stopped past the TTL)
            assert HOSTS + "a" not in store.data
            while (got := await next_put(store))[1] == lease:
                pass
            assert got[1] > lease and HOSTS + "a" in store.data  # a new lease, the key back under it
            store.down = True
            while not any(e.get("event") == "cannot register in the cluster store" for e in logs):
                await asyncio.sleep(0.01)
            granted = store.granted
            store.down = False
            back = await next_put(store)
            assert back[1] == store.granted == granted + 1  # a lease granted again after the outage
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # stopped: its lease revoked, the key gone (the one abandoned in the outage lapses by its TTL)
    assert HOSTS + "a" not in store.data and back[1] not in store.leases
    await close(f)
    assert LEASE_TTL_S >= 3  # a renewal every TTL/3 s outlives one lost round


async def test_host_info_names_a_reachable_address_and_only_listening_ports(fleet: Fleet) -> None:
    import socket

    info = await host_info(fleet.host, Settings(relocation_address="10.1.2.3"), [])
    assert (info["name"], info["address"], info["port"], info["ssl_port"]) == ("a", "10.1.2.3", None, None)
    for everywhere in ("", "0.0.0.0", "::"):
        info = await host_info(fleet.host, Settings(relocation_address=everywhere, relocation_ssl_server=True), [])
        assert info["address"] == socket.gethostname() and info["ssl_port"] == 8003
