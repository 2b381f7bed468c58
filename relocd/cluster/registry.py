"""The fleet in the cluster store: each daemon under a lease, and what `relocd cluster` shows.

A daemon writes ``/relocd/hosts/NAME`` under a lease it keeps alive (a
host that dies drops out within the lease's TTL) and refreshes the value
as its free memory changes.  Reads for `cluster hosts|domains` and
`evacuate --cluster` come from any host; they never decide a handoff
(the ownership records do, ``ownership.py``).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import TYPE_CHECKING, Any

import structlog

from relocd import __version__
from relocd.cluster.etcd import store_from_settings
from relocd.cluster.ownership import Ownership, OwnershipRecord, RecordError
from relocd.cluster.store import DOMAINS, HOSTS, Store, StoreUnavailable
from relocd.errors import RelocdError

if TYPE_CHECKING:
    from relocd.config.settings import Settings
    from relocd.engine.host import Host

log = structlog.get_logger("relocd.registry")

#: a registration outlives its daemon by at most this many seconds
LEASE_TTL_S = 10


def cluster_ownership(s: Settings) -> Ownership | None:
    store = store_from_settings(s)
    if store is None:
        return None
    return Ownership(store, s.cluster_name or socket.gethostname())


async def register_domain(host: Host, uuid: str, name: str, *, restore: bool = False) -> None:
    """create/restore: the record says this host owns the uuid, or the operation is refused."""
    own = host.cluster
    if own is None:
        return
    try:
        await own.register(uuid, name, restore=restore)
    except StoreUnavailable as exc:
        raise RelocdError(f"{exc.message}; a domain cannot be created or restored without its ownership record") from None


async def domain_saved(host: Host, uuid: str, name: str) -> str | None:
    """A save stopped the domain here: its record says "saved", for a restore on any host.

    After the fact (the domain is gone here): a store that does not answer
    leaves the record owned by this host, so only a restore here takes it
    back; the warning (returned, and logged) says so.
    """
    own = host.cluster
    if own is None:
        return None
    try:
        await own.saved(uuid, name)
    except StoreUnavailable as exc:
        why = f"{exc.message}; the ownership record still names {own.me}: restore the file here"
        log.warning("save: ownership record not marked saved", domain=name, error=why)
        return why
    return None


async def forget_domain(host: Host, uuid: str, name: str) -> str | None:
    """destroy, after the fact: this host's record goes (the uuid is free in the fleet again)."""
    own = host.cluster
    if own is None:
        return None
    try:
        await own.forget(uuid)
    except StoreUnavailable as exc:
        why = f"{exc.message}; the ownership record still names {own.me} (a later create or restore here takes it)"
        log.warning("destroy: ownership record left in the store", domain=name, error=why)
        return why
    return None


async def host_info(host: Host, s: Settings, listening: list[str]) -> dict[str, Any]:
    free = 0
    drivers = sorted(host.drivers)
    for drv in host.drivers.values():
        try:
            free = max(free, (await drv.capabilities()).free_memory_bytes)
        except RelocdError:
            continue
    free = max(0, free - host.reservations.reserved_bytes)
    return {
        "name": host.cluster.me if host.cluster else socket.gethostname(),
        # a listener on every interface is reached by the host's name
        "address": s.relocation_address if s.relocation_address not in ("", "0.0.0.0", "::") else socket.gethostname(),
        "port": s.relocation_port if s.relocation_server else None,
        "ssl_port": s.relocation_ssl_port if s.relocation_ssl_server else None,
        "free_bytes": free,
        "drivers": drivers,
        "domains": len(host.all_domains()),
        "version": __version__,
        "listening": listening,
    }


async def keep_registered(host: Host, s: Settings, listening: Any, period_s: float = LEASE_TTL_S / 3) -> None:
    """Forever: a lease, our key under it, renewed every ``period_s``; a lost lease is granted again."""
    own = host.cluster
    assert own is not None
    store = own.store
    key = HOSTS + own.me
    lease = 0
    try:
        while True:
            try:
                if not lease or not await store.keepalive(lease):
                    lease = await store.grant(LEASE_TTL_S)
                info = await host_info(host, s, listening())
                await store.put(key, json.dumps(info, sort_keys=True).encode(), lease=lease)
            except StoreUnavailable as exc:
                log.warning("cannot register in the cluster store", error=exc.message)
                lease = 0
            await asyncio.sleep(period_s)
    finally:
        if lease:
            await store.revoke(lease)


async def list_hosts(store: Store) -> list[dict[str, Any]]:
    hosts = []
    for entry in await store.list(HOSTS):
        try:
            doc = json.loads(entry.value)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict):
            hosts.append(doc)
    return sorted(hosts, key=lambda h: str(h.get("name")))


async def list_domains(store: Store) -> list[dict[str, Any]]:
    out = []
    for entry in await store.list(DOMAINS):
        try:
            rec = OwnershipRecord.decode(entry.value)
        except RecordError:
            continue
        out.append({
            "uuid": entry.key.removeprefix(DOMAINS), "name": rec.name, "host": rec.host, "epoch": rec.epoch,
            "state": rec.state, "migration": rec.migration,
        })  # fmt: skip
    return sorted(out, key=lambda d: (d["host"], d["name"]))


def target_port(h: dict[str, Any], tls: bool) -> int | None:
    """The registered port a migration over TLS (or not) dials on host ``h``."""
    port = h.get("ssl_port") if tls else h.get("port")
    return port if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 else None


def fit_targets(
    hosts: list[dict[str, Any]], me: str, memory_bytes: int, driver: str, *, tls: bool = False
) -> list[dict[str, Any]]:
    """evacuate --cluster: the registered hosts that run the driver and have the room, roomiest first, never us."""
    fit = [
        h for h in hosts
        if h.get("name") != me and driver in (h.get("drivers") or ()) and int(h.get("free_bytes") or 0) >= memory_bytes
        and target_port(h, tls) is not None and h.get("address")
    ]  # fmt: skip
    return sorted(fit, key=lambda h: (-int(h.get("free_bytes") or 0), str(h.get("name"))))


def pick_target(
    hosts: list[dict[str, Any]], me: str, memory_bytes: int, driver: str, *, tls: bool = False
) -> dict[str, Any] | None:
    """The one registered host with the most free memory that runs the driver, never us."""
    fit = fit_targets(hosts, me, memory_bytes, driver, tls=tls)
    return fit[0] if fit else None
