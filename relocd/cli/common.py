"""What every command shares: where the daemon and the config are, exit statuses, output."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from relocd.errors import RelocdError
from relocd.server.control import EventCallback, call, one_line

DEFAULT_CONTROL = Path("/run/relocd/control.sock")
DEFAULT_CONFIG = Path("/etc/relocd/relocd-config.sxp")
CONTROL_ENV = "RELOCD_CONTROL"
CONFIG_ENV = "RELOCD_CONFIG"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(RelocdError):
    """Arguments that parse but make no sense: exit 2."""

    exit = EXIT_USAGE


class Failed(RelocdError):
    """An operation this command refuses before the daemon is asked (e.g. migrating to this host): exit 1."""

    exit = EXIT_FAILED


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


def ask(ns: argparse.Namespace, op: str, args: dict[str, Any],
        on_event: EventCallback | None = None) -> Any:
    """Run one op on the local daemon (its own event loop) and return its result."""
    return asyncio.run(call(control_path(ns.control), op, args, on_event))


# --- output ---------------------------------------------------------------


def print_json(value: Any) -> None:
    print(json.dumps(value))


def print_fields(value: Any, prefix: str = "") -> None:
    """A result object as ``key: value`` lines, nested keys dotted."""
    if not isinstance(value, dict):
        print(value if isinstance(value, str) else json.dumps(value))
        return
    for key, item in value.items():
        if isinstance(item, dict) and item:
            print_fields(item, f"{prefix}{key}.")
        elif isinstance(item, list):
            shown = ", ".join(x if isinstance(x, str) else json.dumps(x) for x in item)
            print(f"{prefix}{key}: {shown or '-'}")
        else:
            print(f"{prefix}{key}: {'-' if item is None else item}")


def field(result: Any, key: str, fallback: Any) -> Any:
    """``result[key]`` when the result is an object that has it (and it is not null)."""
    if isinstance(result, dict) and result.get(key) is not None:
        return result[key]
    return fallback


def report(message: str) -> None:
    """The one line on stderr that a failure gets."""
    print(f"relocd: {one_line(message)}", file=sys.stderr, flush=True)
