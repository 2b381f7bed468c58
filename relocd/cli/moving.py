"""Commands about migrations: migrate, job (watch), evacuate, abort, migrate-set, history."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import sys
from collections.abc import Iterable
from typing import Any

from relocd.cli import common
from relocd.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Failed,
    UsageError,
    control_path,
    field,
    print_json,
    report,
    split_host_port,
)
from relocd.cli.tables import format_history_table
from relocd.cli.watch import Watch, abort_handler, interactive, leave, InterruptHandler
from relocd.errors import RelocdError
from relocd.progress import MigrationProgress, describe_failure, summarize_migration
from relocd.server.access import is_ip
from relocd.server.listener import normalise_ip
from relocd.server.control import DaemonError, call, exit_status_for, one_line

#: How long `migrate` waits for HOST to resolve before leaving the own-host check to the daemon.
RESOLVE_TIMEOUT_S = 2.0


def _watched(ns: argparse.Namespace, op: str, args: dict[str, Any],
             display: MigrationProgress | None, on_interrupt: InterruptHandler) -> Any:
    async def run() -> Any:
        return await Watch(control_path(ns.control), display).run(op, args, on_interrupt)

    try:
        return asyncio.run(run())
    finally:
        if display is not None:
            display.finish()


def _display(ns: argparse.Namespace, *, multi: bool = False) -> MigrationProgress | None:
    return None if ns.json else MigrationProgress(sys.stdout, multi=multi)


def _failed_migration(ns: argparse.Namespace, error: str) -> dict[str, Any]:
    """The --json object for a migration the daemon refused to even start."""
    return {"status": "failed", "domain": ns.name, "live": bool(getattr(ns, "live", False)),
            "iterations": 0, "pages_sent": 0, "bytes_sent": 0, "total_ms": 0.0,
            "downtime_ms": 0.0, "verified": None, "error": error}


def _show_result(ns: argparse.Namespace, result: Any, where: str) -> int:
    """migrate's and job's ending: the summary (or JSON) on stdout, a failure once on stderr."""
    if not isinstance(result, dict):
        raise DaemonError(f"daemon sent an unexpected migration result: {one_line(repr(result))}")
    if ns.json:
        print_json(result)
    if result.get("status") == "completed":
        if not ns.json:
            print(summarize_migration(result, where))
        return EXIT_OK
    report(describe_failure(result, where))
    return EXIT_FAILED


# --- migrate to our own host ---------------------------------------------------


def _addresses(host: str) -> set[str]:
    """HOST's addresses (an IP stays itself); empty when it does not resolve in time."""
    try:
        return {normalise_ip(host)} if is_ip(host) else asyncio.run(_resolve(host))
    except (OSError, asyncio.TimeoutError, UnicodeError):
        return set()


async def _resolve(host: str) -> set[str]:
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM),
                                   RESOLVE_TIMEOUT_S)
    return {normalise_ip(str(info[4][0])) for info in infos}


def _listen_entries(listen: Iterable[Any]) -> list[tuple[str, int]]:
    out = []
    for entry in listen:
        if not isinstance(entry, str):
            continue
        addr, _, port = entry.rpartition(":")
        if port.isdigit():
            out.append((normalise_ip(addr.strip("[]")), int(port)))
    return out


def own_listener(addresses: set[str], port: int | None, listen: Iterable[Any]) -> str | None:
    """The local daemon's listener that HOST (``addresses``, ``port``) would reach, if any.

    A listener on all interfaces is reached through loopback for certain; its
    other addresses are the daemon's to know (it may live in another network
    namespace than this command), so those are left to the daemon.
    """
    for addr, lport in _listen_entries(listen):
        if port is not None and port != lport:
            continue
        wildcard = addr in ("0.0.0.0", "::")
        for a in addresses:
            if a == addr or (wildcard and ipaddress.ip_address(a).is_loopback):
                return f"[{addr}]:{lport}" if ":" in addr else f"{addr}:{lport}"
    return None


def _refuse_own_host(ns: argparse.Namespace, host: str, port: int | None) -> None:
    try:
        status = common.ask(ns, "status", {})
    except RelocdError:
        return  # the daemon will say what is wrong when asked to migrate
    listen = field(status, "listen", [])
    if not isinstance(listen, list) or not listen:
        return
    addresses = _addresses(host)
    if not addresses:
        return
    hit = own_listener(addresses, port, listen)
    if hit is not None:
        raise Failed(f"{host} is this host (the local daemon listens on {hit}): "
                     "migrate to another host")


# --- the commands -----------------------------------------------------------------


def cmd_migrate(ns: argparse.Namespace) -> int:
    host, port = split_host_port(ns.host, ns.port)
    args: dict[str, Any] = {
        "name": ns.name, "host": host, "port": port, "live": ns.live, "ssl": ns.ssl,
        "verify": ns.verify, "policy": ns.policy, "downtime_ms": ns.downtime_ms,
        "max_bandwidth": ns.max_bandwidth}
    if ns.timeout is not None:
        args["timeout"] = ns.timeout
    if ns.timeout_action is not None:
        args["timeout_action"] = ns.timeout_action
    if ns.channels is not None:
        args["channels"] = ns.channels
    if ns.auto_converge is not None:
        args["auto_converge"] = ns.auto_converge
    where = host if port is None else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sent = False
    try:
        _refuse_own_host(ns, host, port)
        sent = True  # from here on the request may have reached the daemon
        display = _display(ns)
        handler = abort_handler(f"migration of {ns.name}", {"name": ns.name},
                                ask=interactive(ns.json))
        result = _watched(ns, "migrate", args, display, handler)
    except KeyboardInterrupt:
        if sent:
            report(f"left; the migration of {ns.name} goes on in the daemon "
                   f"(relocd job {ns.name} to watch it, relocd abort {ns.name} to cancel it)")
        raise
    except RelocdError as exc:
        if ns.json and exit_status_for(exc) == EXIT_FAILED:
            print_json(_failed_migration(ns, exc.message))
        raise
    return _show_result(ns, result, where)


def cmd_job(ns: argparse.Namespace) -> int:
    """Attach to a migration in flight: the same display and ending as `migrate`."""
    try:
        result = _watched(ns, "job", {"name": ns.name}, _display(ns), leave)
    except KeyboardInterrupt:
        report(f"stopped watching; the migration of {ns.name} goes on in the daemon")
        raise
    return _show_result(ns, result, str(field(result, "target", "its target")))


def cmd_abort(ns: argparse.Namespace) -> int:
    if (ns.name is None) == (not ns.all):
        raise UsageError("abort: give NAME or --all (not both)")
    args: dict[str, Any] = {"all": True} if ns.all else {"name": ns.name}
    result = common.ask(ns, "abort", args)
    if ns.json:
        print_json(result)
    aborted = [str(n) for n in field(result, "aborted", [])]
    refused = field(result, "refused", {})
    refused = refused if isinstance(refused, dict) else {}
    results = field(result, "results", {})
    results = results if isinstance(results, dict) else {}
    if not ns.json:
        for name in aborted:
            done = results.get(name)
            kind = "save" if isinstance(done, dict) and "file" in done else "migration"
            print(f"Aborted the {kind} of {name}: it stays on this host")
        if not aborted and not refused:
            print("Nothing to abort")
    if refused:
        report("not aborted: " + "; ".join(f"{n}: {why}" for n, why in refused.items()))
        return EXIT_FAILED
    return EXIT_OK


def cmd_settle(ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {"migration_id": ns.migration_id, "action": ns.action, "force": bool(ns.force)}
    result = common.ask(ns, "settle", args)
    if ns.json:
        print_json(result)
    else:
        kept = "runs here" if ns.action == "keep-here" else "was dropped here"
        print(f"Settled migration {field(result, 'migration_id', ns.migration_id)}: "
              f"{field(result, 'domain', '?')} {kept}")
    return EXIT_OK


def cmd_migrate_set(ns: argparse.Namespace) -> int:
    if ns.downtime_ms is None and ns.max_bandwidth is None:
        raise UsageError("migrate-set: give --downtime-ms and/or --max-bandwidth")
    args: dict[str, Any] = {"name": ns.name}
    if ns.downtime_ms is not None:
        args["downtime_ms"] = ns.downtime_ms
    if ns.max_bandwidth is not None:
        args["max_bandwidth"] = ns.max_bandwidth
    result = common.ask(ns, "migrate_set", args)
    if ns.json:
        print_json(result)
        return EXIT_OK
    downtime = field(result, "downtime_ms", None)
    bandwidth = field(result, "max_bandwidth", None)
    shown = [f"downtime target {downtime} ms" if downtime is not None else "no downtime target",
             f"bandwidth cap {bandwidth}" if bandwidth else "no bandwidth cap"]
    print(f"{field(result, 'name', ns.name)}: {', '.join(shown)} from the next round")
    return EXIT_OK


def cmd_history(ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {}
    if ns.name is not None:
        args["name"] = ns.name
    if ns.limit is not None:
        args["limit"] = ns.limit
    entries = common.ask(ns, "history", args)
    entries = entries if isinstance(entries, list) else []
    if ns.json:
        print_json(entries)
    elif not entries:
        print("No finished migrations or saves" + (f" of {ns.name}" if ns.name else ""))
    else:
        width = None
        if sys.stdout.isatty():
            from relocd.progress import terminal_width

            width = terminal_width() - 1
        print(format_history_table(entries, show_domain=ns.name is None, width=width))
    return EXIT_OK


def cmd_evacuate(ns: argparse.Namespace) -> int:
    if bool(ns.hosts) == bool(ns.cluster):
        raise UsageError("evacuate: name target hosts, or --cluster for the cluster store's (not both)")
    args: dict[str, Any] = {"hosts": list(ns.hosts), "parallel": ns.parallel,
                            "live": bool(ns.live), "ssl": ns.ssl}
    if ns.cluster:
        args["cluster"] = True
    if ns.port is not None:
        args["port"] = ns.port
    try:
        handler = abort_handler("evacuation (every migration it started)", {"all": True},
                                ask=interactive(ns.json))
        result = _watched(ns, "evacuate", args, _display(ns, multi=True), handler)
    except KeyboardInterrupt:
        report("left; the evacuation goes on in the daemon (relocd abort --all to cancel it)")
        raise
    if not isinstance(result, dict):
        raise DaemonError(f"daemon sent an unexpected evacuate result: {one_line(repr(result))}")
    moved = [str(n) for n in field(result, "moved", [])]
    failed = field(result, "failed", {})
    failed = failed if isinstance(failed, dict) else {}
    if ns.json:
        print_json(result)
    else:
        for res in field(result, "results", []):
            if isinstance(res, dict) and res.get("status") == "completed":
                print(summarize_migration(res, str(res.get("target") or "?")))
        total = len(moved) + len(failed)
        if total == 0:
            print("Nothing to evacuate: no domains on this host")
        else:
            print(f"Evacuated {len(moved)} of {total} domain{'s' if total != 1 else ''}"
                  + (f" to {', '.join(ns.hosts) or _targets_of(result)}" if moved else "") + ".")
    if failed:
        report(f"{len(failed)} domain{'s' if len(failed) != 1 else ''} not moved: "
               + "; ".join(f"{n}: {why}" for n, why in failed.items()))
        return EXIT_FAILED
    return EXIT_OK


def _targets_of(result: Any) -> str:
    """The hosts an evacuation moved domains to (--cluster picked them)."""
    targets = [str(r.get("target")) for r in field(result, "results", [])
               if isinstance(r, dict) and r.get("status") == "completed" and r.get("target")]
    return ", ".join(dict.fromkeys(targets)) or "?"


async def complete_domains(path: Any) -> list[str]:
    """Domain names for shell completion (quietly none when no daemon answers)."""
    try:
        domains = await asyncio.wait_for(call(path, "list", {}), 1.0)
    except (RelocdError, OSError, asyncio.TimeoutError):
        return []
    return [str(d.get("name")) for d in domains if isinstance(d, dict)] if isinstance(domains, list) else []
