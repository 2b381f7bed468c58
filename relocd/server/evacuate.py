"""`relocd evacuate HOST...`: empty this host, each domain with `migrate`'s own handoff.

Domains go biggest first, ``parallel`` at a time, each to the target with
the most free memory as the targets reported it at their last reservation
(a target not asked yet counts as roomiest, so each gets tried); a target
that refuses a domain (or cannot be reached) is skipped for that domain and
the next one is tried.  Each move is an ordinary migration (its own claim,
journal, rollback), so a failed one leaves its domain running here.
`relocd abort --all` stops the evacuation: moves in flight are aborted
(before GO), queued ones never start.

``--cluster`` takes the targets from the cluster store's registry instead
(docs/cluster.md): for each domain, the registered hosts that run its
driver and have room for it, roomiest first, never this host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from relocd.cluster.registry import fit_targets, list_hosts, target_port
from relocd.drivers.base import INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX, Domain, DomainState
from relocd.errors import ConfigError, RelocdError
from relocd.server.requests import arg

log = structlog.get_logger("relocd.evacuate")

Migrate = Callable[[dict[str, Any], Any], Awaitable[dict[str, Any]]]


def split_target(text: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or a bare IPv6 address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        return text, None
    if not port:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad target {text!r}: the port must be a number from 1 to 65535")
    return host, int(port)


class Evacuation:
    """One `relocd evacuate`: its targets' known free memory, and whether it was stopped."""

    def __init__(self, hosts: list[str]) -> None:
        #: bytes free on each target as it last said (None: not asked yet)
        self.free: dict[str, int | None] = {h: None for h in hosts}
        self.stopped = asyncio.Event()

    def order(self, tried: set[str], allowed: set[str] | None = None) -> list[str]:
        """Targets not yet tried for a domain, roomiest first (unasked ones before all)."""
        left = [h for h in self.free if h not in tried and (allowed is None or h in allowed)]

        def room(h: str) -> int:
            free = self.free[h]
            return 1 << 62 if free is None else free

        return sorted(left, key=lambda h: -room(h))


async def cluster_targets(host: Any, domains: list[Domain], tls: bool) -> tuple[dict[str, int], dict[str, set[str]]]:
    """--cluster: each registered target's free bytes (as HOST:PORT), and which of them fit each domain."""
    own = host.cluster
    if own is None:
        raise ConfigError("evacuate --cluster needs a cluster store (relocd-cluster-store; docs/cluster.md)")
    registered = await list_hosts(own.store)  # StoreUnavailable: its one line, nothing moved
    free: dict[str, int] = {}
    fits: dict[str, set[str]] = {}
    for dom in domains:
        room = fit_targets(registered, own.me, dom.config.memory_mib << 20, dom.config.driver, tls=tls)
        names = set()
        for h in room:
            address = str(h["address"])
            target = f"[{address}]:{target_port(h, tls)}" if ":" in address else f"{address}:{target_port(h, tls)}"
            free[target] = int(h.get("free_bytes") or 0)
            names.add(target)
        fits[dom.name] = names
    return free, fits


def no_fit(dom: Domain) -> str:
    return f"no other registered host runs {dom.config.driver} with {dom.config.memory_mib} MiB free"


async def evacuate(
    host: Any, migrate: Migrate, evacuations: set[Evacuation], args: dict[str, Any], sink: Any,
    default_ssl: bool = False,
) -> dict[str, Any]:
    """args: hosts [HOST[:PORT]] or cluster (True), parallel (1), live, ssl, port (for hosts without one), verify."""
    cluster = bool(arg(args, "cluster", bool, False))
    hosts = arg(args, "hosts", list, [])
    if cluster and hosts:
        raise ConfigError("evacuate: name target hosts or --cluster, not both")
    if not cluster and (not hosts or not all(isinstance(h, str) and h for h in hosts)):
        raise ConfigError("evacuate needs at least one target host (or --cluster)")
    for h in hosts:
        split_target(h)  # a bad one is refused before anything moves
    parallel = arg(args, "parallel", int, 1)
    if parallel < 1:
        raise ConfigError("--parallel must be at least 1")
    extra: dict[str, Any] = {k: args[k] for k in ("live", "ssl", "port", "verify") if k in args}
    domains = sorted(
        (
            d
            for d in host.all_domains()
            if not d.name.endswith((INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX))
            and d.state in (DomainState.RUNNING, DomainState.PAUSED)
            and host.claims.get(d.config.uuid) is None
        ),
        key=lambda d: (-d.config.memory_mib, d.name),
    )
    names = [d.name for d in domains]  # a domain object's name changes as it moves
    fits: dict[str, set[str]] | None = None
    free: dict[str, int] = {}
    if cluster:
        tls = default_ssl if args.get("ssl") is None else bool(args["ssl"])
        extra["ssl"] = tls  # the port picked is the registered one for this transport
        extra.pop("port", None)
        free, fits = await cluster_targets(host, domains, tls)
        hosts = list(free)
    evac = Evacuation(list(dict.fromkeys(hosts)))
    if fits is not None:
        evac.free.update(free)
    evacuations.add(evac)
    gate = asyncio.Semaphore(parallel)
    results: dict[str, dict[str, Any]] = {}
    log.info("evacuating", domains=names, targets=list(evac.free), parallel=parallel)

    async def move(name: str) -> None:
        if fits is not None and not fits[name]:
            results[name] = {"status": "failed", "domain": name, "error": no_fit(domains[names.index(name)])}
            return
        async with gate:
            tried: set[str] = set()
            while not evac.stopped.is_set():
                targets = evac.order(tried, None if fits is None else fits[name])
                if not targets:
                    return
                target = targets[0]
                tried.add(target)
                await sink.emit(phase="evacuate", domain=name, target=target)
                where = dict(extra)
                where["host"], port = split_target(target)
                if port is not None:
                    where["port"] = port
                try:
                    result = await migrate({"name": name, **where}, sink)
                except RelocdError as exc:  # refused before it started (busy, gone meanwhile)
                    results[name] = {"status": "failed", "domain": name, "error": exc.message}
                    return
                results[name] = result
                free = result.get("target_free_bytes")
                if isinstance(free, int):
                    evac.free[target] = free
                if result.get("status") != "failed":
                    return  # moved, or rolled back / cancelled / in doubt: not for another target
                log.info("target refused; trying the next", domain=name, target=target, error=result.get("error"))

    try:
        await asyncio.gather(*(move(n) for n in names))
    finally:
        evacuations.discard(evac)
    moved = [n for n, r in results.items() if r.get("status") == "completed"]
    failed = {n: str(r.get("error") or r.get("status")) for n, r in results.items() if r.get("status") != "completed"}
    for n in names:
        if n not in results:
            failed[n] = "not started: the evacuation was aborted"
    log.info("evacuation done", moved=len(moved), failed=len(failed))
    return {"moved": moved, "failed": failed, "results": list(results.values())}
