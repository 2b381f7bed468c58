"""The `relocd` command line: every command, its options, their defaults and an example.

Short forms are xm's where xm had them (``migrate -l``, ``-p PORT``,
``save -c``).  The man page and the shell completion are built from this
parser (``relocd.cli.extras``).
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

from relocd.cli import args as types
from relocd.cli.common import CONFIG_ENV, CONTROL_ENV, DEFAULT_CONFIG, DEFAULT_CONTROL
from relocd.units import RATE_UNITS_HELP

Command = Callable[[argparse.Namespace], int]

DESCRIPTION = "Live migration daemon (xend's relocation server, renewed)."

EPILOG = """\
commands that talk to a daemon take --control PATH (env RELOCD_CONTROL).
exit status: 0 success, 1 failed operation (one line on stderr), 2 bad usage
or bad config, 130 interrupted.

example:
  relocd create web1 --memory 512 --workload uniform:rate=100MB/s
  relocd migrate -l web1 hostb"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; an option's default shown when it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "%(default)" in text
            or not action.option_strings
            or any(action.default is v for v in (None, False, True, argparse.SUPPRESS))
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _complete_domains(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """argcomplete: the local daemon's domain names."""
    import asyncio

    from relocd.cli.common import control_path
    from relocd.cli.moving import complete_domains

    path = control_path(getattr(parsed_args, "control", None))
    return [n for n in asyncio.run(complete_domains(path)) if n.startswith(prefix)]


def _domain(p: argparse.ArgumentParser, *, nargs: str | None = None, help: str = "domain name") -> None:
    action = p.add_argument("name", metavar="NAME", nargs=nargs, help=help)
    setattr(action, "completer", _complete_domains)


def build_parser() -> argparse.ArgumentParser:
    from relocd import __version__
    from relocd.cli import checkconfig, commands, extras, moving

    parser = argparse.ArgumentParser(
        prog="relocd", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"relocd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    control = argparse.ArgumentParser(add_help=False)
    control.add_argument("--control", metavar="PATH",
                         help=f"the daemon's control socket (env {CONTROL_ENV}, else the "
                              f"config file's relocd-control-socket, else {DEFAULT_CONTROL})")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the result as JSON")

    def command(name: str, func: Command, help: str, example: str,
                *parents: argparse.ArgumentParser, aliases: tuple[str, ...] = (),
                description: str | None = None) -> argparse.ArgumentParser:
        text = textwrap.fill(description or help, 79)
        p = sub.add_parser(name, help=help, description=text, parents=list(parents),
                           epilog=f"example:\n  {example}", formatter_class=HelpFormatter,
                           aliases=list(aliases))
        p.set_defaults(func=func, command=name)
        return p

    def ssl_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ssl", action=argparse.BooleanOptionalAction, default=None,
                       help="migrate over TLS, or not (default: the config's xend-relocation-ssl)")

    # -- the daemon -------------------------------------------------------------
    p = command("serve", commands.cmd_serve, "run the daemon (in the foreground)",
                "relocd serve --config /etc/relocd/relocd-config.sxp", control)
    p.add_argument("--config", metavar="FILE",
                   help=f"config file (env {CONFIG_ENV}; default {DEFAULT_CONFIG} if it exists, "
                        "else built-in defaults)")
    p.add_argument("--address", metavar="A",
                   help="relocation listen address (default: the config's xend-relocation-address)")
    p.add_argument("-p", "--port", metavar="N", type=types.port,
                   help="relocation TCP port (default: the config's xend-relocation-port, 8002)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="domain records and journal (default: the config's relocd-state-dir)")
    p.add_argument("--log-format", choices=("auto", "json", "console"),
                   help="log lines as JSON or for a console (default: the config's, auto)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="least important lines logged (default: the config's relocd-log-level, info)")

    p = command("check-config", checkconfig.cmd_check_config,
                "check a config file as serve would, reporting every error and warning",
                "relocd check-config --config /etc/relocd/relocd-config.sxp")
    p.add_argument("--config", metavar="FILE",
                   help=f"config file (env {CONFIG_ENV}, default {DEFAULT_CONFIG})")

    command("status", commands.cmd_status, "describe the running daemon", "relocd status --json",
            control, as_json)

    # -- domains ------------------------------------------------------------------
    p = command("create", commands.cmd_create, "create and start a domain",
                "relocd create web1 --memory 2G --vcpus 2 --workload hotset:size=64M,rate=200MB/s",
                control, as_json)
    p.add_argument("name", metavar="NAME", help="domain name")
    p.add_argument("--memory", metavar="SIZE", type=types.memory_mib, required=True,
                   help="memory: a number is MiB (as xm's memory=); 512M, 2G and 1GiB are binary")
    p.add_argument("--vcpus", metavar="N", type=types.positive_int, default=1,
                   help="virtual CPUs")
    p.add_argument("--driver", choices=("sim", "kvm", "xen"),
                   help="hypervisor driver (default: the config's relocd-default-driver, sim)")
    p.add_argument("--workload", metavar="SPEC", default="idle",
                   help="how the guest dirties memory: idle, uniform:rate=100MB/s, "
                        "hotset:size=64M,rate=200MB/s, sweep:rate=1GB/s")
    p.add_argument("--vif", metavar="SPEC", type=types.vif, action="append",
                   help="network interface: mac=..,ip=A B,bridge=BR (repeatable; default none)")

    command("list", commands.cmd_list, "list domains (a domain being sent shows as migrating-NAME)",
            "relocd list --json", control, as_json)

    p = command("save", commands.cmd_save, "save a domain to a file (it stops, unless -c)",
                "relocd save web1 /var/lib/relocd/save/web1.sav", control, as_json)
    _domain(p)
    p.add_argument("file", metavar="FILE", help="savefile to write")
    p.add_argument("-c", "--checkpoint", action="store_true", help="keep the domain running")

    p = command("restore", commands.cmd_restore, "restore a domain from a savefile",
                "relocd restore /var/lib/relocd/save/web1.sav", control, as_json)
    p.add_argument("file", metavar="FILE", help="savefile to read (it stays intact)")

    p = command("destroy", commands.cmd_destroy, "destroy a domain", "relocd destroy web1", control)
    _domain(p)

    p = command("inspect", commands.cmd_inspect, "describe a savefile",
                "relocd inspect web1.sav --json", control, as_json)
    p.add_argument("file", metavar="FILE", help="savefile to read")

    for name, func, text in (
        ("pause", commands.cmd_domain_op, "pause a domain"),
        ("resume", commands.cmd_domain_op, "resume a paused domain"),
        ("stats", commands.cmd_domain_op, "a domain's counters"),
        ("check", commands.cmd_check, "verify a guest's memory invariant (pauses it briefly)"),
    ):
        p = command(name, func, text, f"relocd {name} web1", control, as_json)
        _domain(p)

    # -- migrations ----------------------------------------------------------------
    p = command("migrate", moving.cmd_migrate, "send a domain to another host",
                "relocd migrate -l web1 hostb --max-bandwidth 500MB/s", control, as_json,
                description="Send a domain to another host's relocd. The migration runs in the "
                            "daemon: Ctrl-C on a terminal asks whether to abort it (with --json "
                            "or no terminal it aborts); closing the terminal leaves it running.")
    _domain(p)
    p.add_argument("host", metavar="HOST", help="target host: name, address, HOST:PORT or [IPv6]:PORT")
    p.add_argument("-p", "--port", metavar="N", type=types.port,
                   help="target's relocation port (default: the config's, 8002; 8003 with TLS)")
    p.add_argument("-l", "--live", action="store_true", help="precopy while the domain runs")
    ssl_option(p)
    p.add_argument("--verify", action="store_true", help="check a digest of all memory")
    p.add_argument("--policy", choices=("xend", "downtime"),
                   help="when to stop precopy (default: the config's relocd-precopy-policy, downtime)")
    p.add_argument("--downtime-ms", metavar="N", type=types.positive_int,
                   help="downtime target of the downtime policy (default: the config's, 20)")
    p.add_argument("--max-bandwidth", metavar="RATE", type=types.rate,
                   help=f"bandwidth cap, e.g. 500MB/s; {RATE_UNITS_HELP} "
                        "(default: the config's relocd-max-bandwidth, none)")
    p.add_argument("--timeout", metavar="S", type=types.seconds,
                   help="give up converging after S seconds (default: never)")
    p.add_argument("--timeout-action", choices=("abort", "stop"),
                   help="at --timeout: abort (the domain runs on here) or stop and copy "
                        "(default: the daemon's, abort)")
    p.add_argument("--no-auto-converge", dest="auto_converge", action="store_false", default=None,
                   help="never throttle the guest, even when it dirties memory faster than the link "
                        "carries it (default: the config's relocd-auto-converge, on)")
    p.add_argument("--channels", metavar="N", type=types.channels,
                   help="connections to stripe the pages over, 1 to 16 "
                        "(default: the config's relocd-migration-channels, 4)")

    p = command("job", moving.cmd_job, "watch a migration in flight, started by anyone",
                "relocd job web1", control, as_json, aliases=("watch",),
                description="Attach to a migration in flight (from another terminal, a cron job, "
                            "evacuate): the same display and ending as migrate. Ctrl-C stops "
                            "watching; the migration goes on.")
    _domain(p)

    p = command("abort", moving.cmd_abort, "cancel an outgoing migration or save before GO",
                "relocd abort web1", control, as_json,
                description="Cancel an outgoing migration (or save) at any phase before GO: the "
                            "domain runs on here and the target drops its copy. After GO it is "
                            "refused.")
    _domain(p, nargs="?", help="domain whose migration to cancel")
    p.add_argument("--all", action="store_true", help="every outgoing migration and save")

    p = command("settle", moving.cmd_settle, "end an in-doubt migration by hand when its peer cannot",
                "relocd settle 5d1e0f6e-9c1a-4c57-9a53-3c2c7d4d8b10 --keep-here", control, as_json,
                description="For a migration left in doubt because its peer is gone for good, or "
                            "because the target lost a copy that may have run (docs/faults.md): keep "
                            "this host's copy (it runs here) or drop it. Refused while the peer "
                            "answers and can settle it itself.")
    p.add_argument("migration_id", metavar="MIGRATION_ID",
                   help="the migration's id (relocd status' logs and every progress event show it)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep-here", dest="action", action="store_const", const="keep-here",
                     help="this host's copy becomes the domain")
    how.add_argument("--drop-here", dest="action", action="store_const", const="drop-here",
                     help="this host's copy is destroyed; the peer's is the domain")
    p.add_argument("--force", action="store_true",
                   help="also when the target answers RECEIVING (it lost a copy that may have run)")

    p = command("migrate-set", moving.cmd_migrate_set,
                "change a running migration's downtime target or bandwidth cap",
                "relocd migrate-set web1 --downtime-ms 50 --max-bandwidth 1GB/s", control, as_json,
                description="Change the policy of a migration in flight (as virsh "
                            "migrate-setmaxdowntime and migrate-setspeed); the next round uses it.")
    _domain(p)
    p.add_argument("--downtime-ms", metavar="N", type=types.positive_int,
                   help="new downtime target")
    p.add_argument("--max-bandwidth", metavar="RATE", type=types.rate,
                   help=f"new bandwidth cap, e.g. 100MB/s; {RATE_UNITS_HELP}")

    p = command("history", moving.cmd_history, "finished migrations and saves, newest first",
                "relocd history web1 --limit 10", control, as_json)
    _domain(p, nargs="?", help="only this domain's (default: every domain's)")
    p.add_argument("--limit", metavar="N", type=types.positive_int,
                   help="at most N entries (default: the daemon's)")

    p = command("evacuate", moving.cmd_evacuate, "move every local domain to other hosts",
                "relocd evacuate -l hostb hostc --parallel 2", control, as_json,
                description="Move every local domain to the given hosts (spread by their free "
                            "memory), N at a time, each with migrate's handoff and rollback. "
                            "With --cluster, to the hosts registered in the cluster store that run "
                            "each domain's driver and have room for it. "
                            "Exit 0 only if every domain moved.")
    p.add_argument("hosts", metavar="HOST", nargs="*", help="target hosts (none with --cluster)")
    p.add_argument("--cluster", action="store_true",
                   help="pick targets from the cluster store's registered hosts (docs/cluster.md)")
    p.add_argument("--parallel", metavar="N", type=types.positive_int, default=1,
                   help="migrations at a time")
    p.add_argument("-l", "--live", action="store_true", help="precopy while the domains run")
    ssl_option(p)
    p.add_argument("-p", "--port", metavar="N", type=types.port,
                   help="targets' relocation port (default: the config's, 8002; 8003 with TLS)")

    p = command("cluster", commands.cmd_cluster, "the fleet in the cluster store: hosts or domains",
                "relocd cluster domains --json", control, as_json,
                description="Show the fleet as the cluster store (relocd-cluster-store, "
                            "docs/cluster.md) holds it, from any host: 'hosts' lists every daemon "
                            "registered under its lease (address, ports, free memory, domains, "
                            "drivers, version; * marks this one); 'domains' lists every ownership "
                            "record (owner, epoch, state, the migration that last changed it).")
    p.add_argument("what", metavar="WHAT", choices=("hosts", "domains"), help="hosts or domains")

    # -- the command itself ------------------------------------------------------------
    p = command("completion", extras.cmd_completion, "print a shell completion script",
                'eval "$(relocd completion bash)"',
                description="Print the completion script for a shell (needs argcomplete: "
                            "pip install 'relocd[completion]'). For bash, put "
                            'eval "$(relocd completion bash)" in ~/.bashrc.')
    p.add_argument("shell", choices=extras.SHELLS, help="the shell")
    return parser
