"""The daemon itself and the domain commands: serve, create, list, save, restore, destroy, ..."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from relocd.cli import common
from relocd.cli.common import (
    CONTROL_ENV,
    EXIT_FAILED,
    EXIT_OK,
    default_config_path,
    field,
    print_fields,
    print_json,
    report,
)
from relocd.cli.tables import format_cluster_domains, format_cluster_hosts, format_domain_table
from relocd.errors import ConfigError, RelocdError


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
        ("log_level", ns.log_level),
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


def _driver_of(ns: argparse.Namespace, name: str) -> str | None:
    """The driver a new domain got, when create's answer does not say (the config's default)."""
    try:
        domains = common.ask(ns, "list", {})
    except RelocdError:
        return None
    for dom in domains if isinstance(domains, list) else []:
        if isinstance(dom, dict) and dom.get("name") == name and dom.get("driver"):
            return str(dom["driver"])
    return None


def cmd_create(ns: argparse.Namespace) -> int:
    args = {"name": ns.name, "memory": ns.memory, "vcpus": ns.vcpus,
            "driver": ns.driver, "workload": ns.workload, "vifs": ns.vif or []}
    result = common.ask(ns, "create", args)
    if ns.json:
        print_json(result)
        return EXIT_OK
    name = str(field(result, "name", ns.name))
    driver = field(result, "driver", None) or ns.driver or _driver_of(ns, name) or "?"
    vcpus = field(result, "vcpus", ns.vcpus)
    print(f"Created {name}: {field(result, 'memory_mib', ns.memory)} MiB, "
          f"{vcpus} vCPU{'s' if vcpus != 1 else ''}, driver {driver}")
    return EXIT_OK


def cmd_list(ns: argparse.Namespace) -> int:
    domains = common.ask(ns, "list", {})
    if ns.json:
        print_json(domains)
    else:
        print(format_domain_table(domains if isinstance(domains, list) else []))
    return EXIT_OK


def cmd_save(ns: argparse.Namespace) -> int:
    target = Path(ns.file).absolute()  # the daemon's working directory is not ours
    result = common.ask(ns, "save", {"name": ns.name, "file": str(target),
                              "checkpoint": ns.checkpoint})
    if ns.json:
        print_json(result)
    status = field(result, "status", "completed")
    if status != "completed":
        report(f"save of {ns.name} to {target} {status}: {field(result, 'error', 'no reason given')}")
        return EXIT_FAILED
    if not ns.json:
        kept = " (still running)" if ns.checkpoint else ""
        print(f"Saved {ns.name} to {target}{kept}")
    return EXIT_OK


def cmd_restore(ns: argparse.Namespace) -> int:
    source = Path(ns.file).absolute()
    result = common.ask(ns, "restore", {"file": str(source)})
    if ns.json:
        print_json(result)
    else:
        name = field(result, "domain", None) or field(result, "name", "the domain")
        print(f"Restored {name} from {source}")
    return EXIT_OK


def cmd_destroy(ns: argparse.Namespace) -> int:
    common.ask(ns, "destroy", {"name": ns.name})
    print(f"Destroyed {ns.name}")
    return EXIT_OK


def cmd_domain_op(ns: argparse.Namespace) -> int:
    """pause, resume, stats: one domain in, its new state out."""
    result = common.ask(ns, ns.command, {"name": ns.name})
    if ns.json:
        print_json(result)
    elif ns.command == "stats":
        print_fields(result)
    else:
        print(f"{field(result, 'name', ns.name)}: {field(result, 'state', 'done')}")
    return EXIT_OK


def cmd_check(ns: argparse.Namespace) -> int:
    """Check the guest's page invariant: exit 1 when a page is lost or stale."""
    result = common.ask(ns, "check", {"name": ns.name})
    if ns.json:
        print_json(result)
    elif field(result, "ok", False):
        print(f"{ns.name}: memory invariant holds")
    if not field(result, "ok", False):
        problem = field(result, "problem", None) or "memory invariant broken"
        report(f"{ns.name}: {problem}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_inspect(ns: argparse.Namespace) -> int:
    result = common.ask(ns, "inspect", {"file": str(Path(ns.file).absolute())})
    if ns.json:
        print_json(result)
    else:
        print_fields(result)
    return EXIT_OK


def cmd_status(ns: argparse.Namespace) -> int:
    result = common.ask(ns, "status", {})
    if ns.json:
        print_json(result)
    else:
        print_fields(result)
    return EXIT_OK


def cmd_cluster(ns: argparse.Namespace) -> int:
    """The fleet in the cluster store, as this host's daemon reads it."""
    rows = common.ask(ns, f"cluster_{ns.what}", {})
    rows = rows if isinstance(rows, list) else []
    if ns.json:
        print_json(rows)
    elif ns.what == "hosts":
        print(format_cluster_hosts(rows))
    else:
        print(format_cluster_domains(rows))
    return EXIT_OK
