"""`relocd check-config`: every error and warning in the file, by the checks `serve` runs.

`serve` refuses to start when a listener cannot be set up: the TLS
listener's key, certificate or CA file does not load, the listen address is
not this host's or names no interface. Those are errors here too, found by
the same functions (``server_context``, ``client_context``); a value the
option table refuses is an error; the rest (what works but is probably not
meant) are warnings.  Exit 2 when there is an error, else 0.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from relocd.cli.common import DEFAULT_CONFIG, EXIT_OK, EXIT_USAGE, default_config_path
from relocd.config.settings import Settings, review_config
from relocd.errors import ConfigError
from relocd.server.control import one_line

_ADDRESS = "xend-relocation-address"
_KEY = "xend-relocation-server-ssl-key-file"
_CERT = "xend-relocation-server-ssl-cert-file"
_CA = "relocd-relocation-ssl-ca-file"


def cmd_check_config(ns: argparse.Namespace) -> int:
    path = Path(ns.config) if ns.config else default_config_path()
    if path is None:
        print(f"no config file at {DEFAULT_CONFIG}: built-in defaults apply")
        return EXIT_OK
    if not path.exists():
        print(f"relocd: {path}: no such file", file=sys.stderr)
        return EXIT_USAGE
    errors, warnings = check_file(path)
    for warning in warnings:
        print(f"relocd: warning: {one_line(warning)}", file=sys.stderr)
    for error in errors:
        print(f"relocd: {one_line(error)}", file=sys.stderr)
    if errors:
        return EXIT_USAGE
    print(f"{path}: ok")
    return EXIT_OK


def check_file(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the config file at ``path``."""
    settings, errors, warnings = review_config(path)
    if settings is not None:
        more_errors, more_warnings = serve_checks(settings)
        errors += more_errors
        warnings += more_warnings
    return errors, warnings


def serve_checks(s: Settings) -> tuple[list[str], list[str]]:
    """What `serve` would refuse (errors) or regret (warnings) with these settings."""
    from relocd.server.tls import client_context, server_context

    where = str(s.config_file) if s.config_file is not None else "settings"
    errors: list[str] = []
    warnings: list[str] = []
    if s.relocation_server or s.relocation_ssl_server:
        problem = address_problem(s.relocation_address)
        if problem:
            errors.append(f"{where}: {_ADDRESS}: {problem}")
    # Each file that is missing, by name (ssl's own error does not say which
    # of key and certificate it could not open), then the contexts themselves.
    missing = [f"{option}: {path}: no such file" for option, path in (
        (_KEY, s.ssl_key_file), (_CERT, s.ssl_cert_file), (_CA, s.ssl_ca_file))
        if path is not None and not path.exists()]
    if s.relocation_ssl_server:
        for problem in missing + _context_problem(server_context, s, missing):
            errors.append(f"{where}: TLS listener cannot start: {problem}")
    tls_files = (s.ssl_key_file, s.ssl_cert_file, s.ssl_ca_file)
    if s.relocation_ssl or any(f is not None for f in tls_files):
        for problem in missing + _context_problem(client_context, s, missing):
            if s.relocation_ssl:
                errors.append(f"{where}: xend-relocation-ssl is on, but outgoing TLS cannot "
                              f"start: {problem}")
            else:
                warnings.append(f"{where}: migrate --ssl will fail: {problem}")
    for what, directory in (("relocd-state-dir", s.state_dir),
                            ("relocd-control-socket", s.control_socket.parent)):
        problem = directory_problem(directory)
        if problem:
            warnings.append(f"{where}: {what}: {problem}")
    from relocd.drivers import DRIVER_NAMES

    if s.default_driver not in DRIVER_NAMES:
        warnings.append(f"{where}: relocd-default-driver: no driver named {s.default_driver!r} "
                        f"(known: {', '.join(DRIVER_NAMES)}): create without --driver will fail")
    return errors, warnings


def _context_problem(build: Callable[[Settings], object], s: Settings, missing: list[str]) -> list[str]:
    """Why the context cannot be built; a missing file is already in ``missing``."""
    try:
        build(s)
    except ConfigError as exc:
        return [] if missing and "no such file" in exc.message else [exc.message]
    return []


def address_problem(address: str) -> str | None:
    """Why `serve` could not listen on ``address`` (not the port: it may be the running daemon's)."""
    if address == "":
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        try:
            socket.if_nametoindex(address)
        except OSError:
            return f"no such address or interface: {address!r}"
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((str(ip), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{ip} is not an address of this host"
            return f"cannot listen on {ip}: {os.strerror(exc.errno) if exc.errno else exc}"
    return None


def directory_problem(directory: Path) -> str | None:
    """Whether `serve`, as this user, can use (or create) ``directory``."""
    path = Path(directory)
    if path.exists():
        if not path.is_dir():
            return f"{path} is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable by this user (serve runs as root?)"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} does not exist and cannot be created by this user (serve runs as root?)"
    return None
