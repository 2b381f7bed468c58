"""`relocd`: run the daemon, or drive the local one over its control socket (as `xm` drove xend).

Exit status: 0 on success, 1 on a failed operation (one line on stderr),
2 on bad usage or bad config, 130 on Ctrl-C.  Never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relocd.drivers.base import MIGRATED_AWAY_SUFFIX
from relocd.errors import ConfigError, RelocdError
from relocd.progress import MigrationProgress, summarize_migration
from relocd.server.control import DaemonError, EventCallback, call, exit_status_for, one_line
from relocd.units import parse_rate, parse_size

DEFAULT_CONTROL = Path("/run/relocd/control.sock")
DEFAULT_CONFIG = Path("/etc/relocd/relocd-config.sxp")
CONTROL_ENV = "RELOCD_CONTROL"
CONFIG_ENV = "RELOCD_CONFIG"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(RelocdError):
    """Arguments that parse but make no sense: exit 2."""

    exit = EXIT_USAGE


# --- where things are --------------------------------------------------------


def default_config_path() -> Path | None:
    """$RELOCD_CONFIG, else /etc/relocd/relocd-config.sxp if it exists, else None."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def control_path(explicit: str | None) -> Path:
    """--control, else $RELOCD_CONTROL, else the config file's, else /run/relocd/control.sock."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONTROL_ENV)
    if env:
        return Path(env)
    config = default_config_path()
    if config is not None:
        try:
            from relocd.config import load_settings

            return Path(load_settings(config, None).control_socket)
        except Exception:  # a best guess only: `serve` reports config errors
            pass
    return DEFAULT_CONTROL


# --- argument types (each error becomes a usage error, exit 2) ---------------


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def _memory_mib(text: str) -> int:
    """``512`` (MiB, as xm's memory=) or a size with a unit such as ``1GiB``."""
    if text.isdigit():
        mib = int(text)
    else:
        try:
            size = parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if size % (1 << 20):
            raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}")
        mib = size >> 20
    if mib < 1:
        raise argparse.ArgumentTypeError(f"memory must be at least 1 MiB: {text!r}")
    return mib


def _rate(text: str) -> str:
    """A rate such as ``1GB/s``, checked here; the daemon gets the text."""
    try:
        rate = parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if rate < 1:
        raise argparse.ArgumentTypeError(f"not a positive rate: {text!r}")
    return text


def _vif(text: str) -> str:
    """A Xen vif spec (``mac=00:16:3e:01:02:03,ip=10.0.0.5 fd00::5,bridge=xenbr0``),
    checked here so a typo is a usage error; the daemon gets the text."""
    from relocd.config import parse_vif_spec

    try:
        parse_vif_spec(text)
    except RelocdError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def split_host_port(host: str, port: int | None) -> tuple[str, int | None]:
    """``hostb``, ``hostb:8002``, ``[fd00::2]:8002`` or a bare IPv6 address."""
    m = re.match(r"^\[([^\]]+)\](?::(\d+))?$", host)
    if m:
        addr, text_port = m.group(1), m.group(2)
    elif host.count(":") == 1:
        addr, _, text_port = host.partition(":")
    else:
        addr, text_port = host, None
    if text_port and port is None:
        if not text_port.isdigit() or not 1 <= int(text_port) <= 65535:
            raise UsageError(f"not a TCP port in {host!r}")
        port = int(text_port)
    if not addr:
        raise UsageError(f"no host in {host!r}")
    return addr, port


# --- talking to the daemon -----------------------------------------------


def _ask(ns: argparse.Namespace, op: str, args: dict[str, Any],
         on_event: EventCallback | None = None) -> Any:
    return asyncio.run(call(control_path(ns.control), op, args, on_event))


def _print_json(value: Any) -> None:
    print(json.dumps(value))


def _print_fields(value: Any, prefix: str = "") -> None:
    """A result object as ``key: value`` lines, nested keys dotted."""
    if not isinstance(value, dict):
        print(value if isinstance(value, str) else json.dumps(value))
        return
    for key, item in value.items():
        if isinstance(item, dict) and item:
            _print_fields(item, f"{prefix}{key}.")
        elif isinstance(item, list):
            shown = ", ".join(x if isinstance(x, str) else json.dumps(x) for x in item)
            print(f"{prefix}{key}: {shown or '-'}")
        else:
            print(f"{prefix}{key}: {'-' if item is None else item}")


def _field(result: Any, key: str, fallback: Any) -> Any:
    return result.get(key, fallback) if isinstance(result, dict) else fallback


def format_domain_table(domains: Sequence[dict[str, Any]]) -> str:
    """The human `list`, like `xm list`; a domain being sent shows as migrating-NAME."""
    rows = []
    for dom in domains:
        name, state = str(dom.get("name", "?")), str(dom.get("state", "?"))
        if state == "migrating":
            # xend's way; the source copy's --migratedaway mark is an inner detail here
            name = f"migrating-{name.removesuffix(MIGRATED_AWAY_SUFFIX)}"
        rows.append((name, str(dom.get("memory_mib", "-")), str(dom.get("vcpus", "-")),
                     state, str(dom.get("driver", "-"))))
    width = max([len("Name"), *(len(r[0]) for r in rows)]) + 2
    lines = [f"{'Name':<{width}}{'Mem(MiB)':>8} {'VCPUs':>5}  {'State':<10} Driver"]
    lines += [f"{n:<{width}}{m:>8} {v:>5}  {s:<10} {d}" for n, m, v, s, d in rows]
    return "\n".join(lines)


# --- the commands -----------------------------------------------------------


def cmd_serve(ns: argparse.Namespace) -> int:
    from relocd.config import load_settings

    config = Path(ns.config) if ns.config is not None else default_config_path()
    if ns.config is not None and not Path(ns.config).exists():
        raise ConfigError(f"{ns.config}: no such file")
    overrides: dict[str, Any] = {}
    env_control = os.environ.get(CONTROL_ENV)
    for key, value in (
        ("relocation_address", ns.address),
        ("relocation_port", ns.port),
        ("control_socket", Path(ns.control) if ns.control
         else Path(env_control) if env_control else None),
        ("state_dir", Path(ns.state_dir) if ns.state_dir else None),
        ("log_format", ns.log_format),
    ):
        if value is not None:
            overrides[key] = value
    if ns.address is not None or ns.port is not None:
        # Naming where to listen on the command line means "do listen", even
        # when the config keeps xend's default (xend-relocation-server no).
        overrides["relocation_server"] = True
    settings = load_settings(config, overrides or None)
    from relocd.server.daemon import run_daemon  # it sets up logging from settings

    return int(run_daemon(settings))


def cmd_check_config(ns: argparse.Namespace) -> int:
    from relocd.config import check_config

    path = Path(ns.config) if ns.config else default_config_path()
    if path is None:
        print(f"no config file at {DEFAULT_CONFIG}: built-in defaults apply")
        return EXIT_OK
    for warning in check_config(path):
        print(f"relocd: warning: {one_line(str(warning))}", file=sys.stderr)
    print(f"{path}: ok")
    return EXIT_OK


def cmd_create(ns: argparse.Namespace) -> int:
    args = {"name": ns.name, "memory": ns.memory, "vcpus": ns.vcpus,
            "driver": ns.driver, "workload": ns.workload, "vifs": ns.vif or []}
    result = _ask(ns, "create", args)
    if ns.json:
        _print_json(result)
    else:
        driver = _field(result, "driver", ns.driver)
        print(f"Created {_field(result, 'name', ns.name)}: "
              f"{_field(result, 'memory_mib', ns.memory)} MiB, "
              f"{_field(result, 'vcpus', ns.vcpus)} vCPU(s)"
              + (f", driver {driver}" if driver else ""))
    return EXIT_OK


def cmd_list(ns: argparse.Namespace) -> int:
    domains = _ask(ns, "list", {})
    if ns.json:
        _print_json(domains)
    else:
        print(format_domain_table(domains if isinstance(domains, list) else []))
    return EXIT_OK


def _failed_migration(ns: argparse.Namespace, error: str) -> dict[str, Any]:
    """The --json object for a migration the daemon refused to even start."""
    return {"status": "failed", "domain": ns.name, "live": bool(ns.live), "iterations": 0,
            "pages_sent": 0, "bytes_sent": 0, "total_ms": 0.0, "downtime_ms": 0.0,
            "verified": None, "error": error}


def cmd_migrate(ns: argparse.Namespace) -> int:
    host, port = split_host_port(ns.host, ns.port)
    args = {"name": ns.name, "host": host, "port": port, "live": ns.live, "ssl": ns.ssl,
            "verify": ns.verify, "policy": ns.policy, "downtime_ms": ns.downtime_ms,
            "max_bandwidth": ns.max_bandwidth}
    where = host if port is None else f"{host}:{port}"
    progress = None if ns.json else MigrationProgress(sys.stdout)
    on_event = None if progress is None else progress.update
    try:
        result = _ask(ns, "migrate", args, on_event)
    except KeyboardInterrupt:
        if progress is not None:
            progress.finish()
        print(f"relocd: interrupted; the migration of {ns.name} goes on in the daemon "
              "(see relocd list)", file=sys.stderr)
        raise
    except RelocdError as exc:
        if progress is not None:
            progress.finish()
        if ns.json and exit_status_for(exc) == EXIT_FAILED:
            _print_json(_failed_migration(ns, exc.message))
        raise
    if not isinstance(result, dict):
        raise DaemonError(f"daemon sent an unexpected migrate result: {one_line(repr(result))}")
    if progress is not None:
        progress.finish()
    if ns.json:
        _print_json(result)
    else:
        print(summarize_migration(result, where))
    if result.get("status") != "completed":
        reason = result.get("error") or result.get("status") or "unknown reason"
        print(f"relocd: migration of {ns.name} {result.get('status', 'failed')}: "
              f"{one_line(str(reason))}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_save(ns: argparse.Namespace) -> int:
    target = Path(ns.file).absolute()  # the daemon's working directory is not ours
    result = _ask(ns, "save", {"name": ns.name, "file": str(target),
                               "checkpoint": ns.checkpoint})
    if ns.json:
        _print_json(result)
    else:
        kept = " (still running)" if ns.checkpoint else ""
        print(f"Saved {ns.name} to {target}{kept}")
    return EXIT_OK


def cmd_restore(ns: argparse.Namespace) -> int:
    source = Path(ns.file).absolute()
    result = _ask(ns, "restore", {"file": str(source)})
    if ns.json:
        _print_json(result)
    else:
        print(f"Restored {_field(result, 'name', 'domain')} from {source}")
    return EXIT_OK


def cmd_destroy(ns: argparse.Namespace) -> int:
    _ask(ns, "destroy", {"name": ns.name})
    print(f"Destroyed {ns.name}")
    return EXIT_OK


def cmd_domain_op(ns: argparse.Namespace) -> int:
    """pause, resume, stats: one domain in, its new state out."""
    result = _ask(ns, ns.command, {"name": ns.name})
    if ns.json:
        _print_json(result)
    elif ns.command == "stats":
        _print_fields(result)
    else:
        print(f"{_field(result, 'name', ns.name)}: {_field(result, 'state', 'done')}")
    return EXIT_OK


def cmd_check(ns: argparse.Namespace) -> int:
    """Check the guest's page invariant: exit 1 when a page is lost or stale."""
    result = _ask(ns, "check", {"name": ns.name})
    if ns.json:
        _print_json(result)
    elif _field(result, "ok", False):
        print(f"{ns.name}: memory invariant holds")
    if not _field(result, "ok", False):
        problem = _field(result, "problem", None) or "memory invariant broken"
        _report(f"{ns.name}: {problem}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_inspect(ns: argparse.Namespace) -> int:
    result = _ask(ns, "inspect", {"file": str(Path(ns.file).absolute())})
    if ns.json:
        _print_json(result)
    else:
        _print_fields(result)
    return EXIT_OK


def cmd_status(ns: argparse.Namespace) -> int:
    result = _ask(ns, "status", {})
    if ns.json:
        _print_json(result)
    else:
        _print_fields(result)
    return EXIT_OK


# --- the parser ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from relocd import __version__

    parser = argparse.ArgumentParser(
        prog="relocd", description="Live migration daemon (xend's relocation server, renewed).")
    parser.add_argument("--version", action="version", version=f"relocd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    control = argparse.ArgumentParser(add_help=False)
    control.add_argument("--control", metavar="PATH",
                         help=f"daemon's control socket (env {CONTROL_ENV}, "
                              f"default {DEFAULT_CONTROL})")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the result as JSON")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str,
                *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=list(parents))
        p.set_defaults(func=func)
        return p

    p = command("serve", cmd_serve, "run the daemon (in the foreground)", control)
    p.add_argument("--config", metavar="FILE",
                   help=f"config file (env {CONFIG_ENV}, default {DEFAULT_CONFIG})")
    p.add_argument("--address", metavar="A", help="relocation listen address")
    p.add_argument("--port", metavar="N", type=_port, help="relocation TCP port")
    p.add_argument("--state-dir", metavar="DIR", help="domain records and journal")
    p.add_argument("--log-format", choices=("auto", "json", "console"))

    p = command("create", cmd_create, "create and start a domain", control, as_json)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--memory", metavar="MIB", type=_memory_mib, required=True)
    p.add_argument("--vcpus", metavar="N", type=_positive_int, default=1)
    p.add_argument("--driver", choices=("sim", "kvm", "xen"),
                   help="hypervisor driver (default: the config's, sim)")
    p.add_argument("--workload", metavar="SPEC", default="idle",
                   help="how the guest dirties memory, e.g. uniform:rate=100MB/s")
    p.add_argument("--vif", metavar="SPEC", type=_vif, action="append",
                   help="network interface: mac=..,ip=A B,bridge=BR (repeatable)")

    p = command("list", cmd_list, "list domains", control, as_json)

    p = command("migrate", cmd_migrate, "send a domain to another host", control, as_json)
    p.add_argument("name", metavar="NAME")
    p.add_argument("host", metavar="HOST")
    p.add_argument("--port", metavar="N", type=_port)
    p.add_argument("--live", action="store_true", help="precopy while the domain runs")
    p.add_argument("--ssl", action="store_true", default=None, help="migrate over TLS")
    p.add_argument("--verify", action="store_true", help="check a digest of all memory")
    p.add_argument("--policy", choices=("xend", "downtime"), help="when to stop precopy")
    p.add_argument("--downtime-ms", metavar="N", type=_positive_int,
                   help="downtime target of the downtime policy")
    p.add_argument("--max-bandwidth", metavar="RATE", type=_rate, help="e.g. 1GB/s")

    p = command("save", cmd_save, "save a domain to a file", control, as_json)
    p.add_argument("name", metavar="NAME")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--checkpoint", action="store_true", help="keep the domain running")

    p = command("restore", cmd_restore, "restore a domain from a savefile", control, as_json)
    p.add_argument("file", metavar="FILE")

    p = command("destroy", cmd_destroy, "destroy a domain", control)
    p.add_argument("name", metavar="NAME")

    p = command("inspect", cmd_inspect, "describe a savefile", control, as_json)
    p.add_argument("file", metavar="FILE")

    p = command("check-config", cmd_check_config, "check a config file")
    p.add_argument("--config", metavar="FILE")

    command("status", cmd_status, "describe the running daemon", control, as_json)

    for name, func, text in (
        ("pause", cmd_domain_op, "pause a domain"),
        ("resume", cmd_domain_op, "resume a paused domain"),
        ("stats", cmd_domain_op, "a domain's counters"),
        ("check", cmd_check, "verify a guest's memory invariant (pauses it briefly)"),
    ):
        p = command(name, func, text, control, as_json)
        p.add_argument("name", metavar="NAME")
    return parser


def _report(message: str) -> None:
    print(f"relocd: {one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relocd` command; returns the exit status."""
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(ns.func(ns))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RelocdError as exc:
        _report(exc.message)
        return exit_status_for(exc)
    except BrokenPipeError:  # `relocd list | head`: the reader left; nothing to say
        try:  # and keep the interpreter from complaining at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILED
    except Exception as exc:
        _report(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
