"""The option table: each config keyword, the settings field it fills, its parser.

As in asyncssh's config handlers, one table says everything about an option;
the loader (``settings.py``) only walks the file and looks keywords up here.
Parsers take the option's text and the config file's directory (relative paths
are resolved against it) and raise :class:`ValueError` with a short reason;
the loader turns that into ``FILE line N: keyword: reason``.

Defaults are not repeated here: they are the :class:`~relocd.config.settings.Settings`
field defaults, which xend's for xend's options.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relocd.units import parse_rate, parse_size

__all__ = [
    "Option",
    "OPTIONS",
    "XEND_OPTIONS",
    "RELOCD_PREFIX",
    "parse_bool",
    "parse_host_port",
    "parse_hosts_allow",
]

ValueParser = Callable[[str, Path], object]

RELOCD_PREFIX = "relocd-"

_TRUE = frozenset({"yes", "y", "1", "on", "true", "t"})
_FALSE = frozenset({"no", "n", "0", "off", "false", "f"})
_DIGITS = re.compile(r"[0-9]{1,18}\Z")
_NUMBER = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?\Z")
#: A host name (``localhost``) or an interface name (``eth0``, ``br-lan``).
_HOST_OR_IFACE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})\Z")
_DRIVER_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


@dataclass(frozen=True)
class Option:
    """One keyword of the config file."""

    keyword: str
    field: str
    parse: ValueParser
    help: str


# --- value parsers -------------------------------------------------------


def parse_bool(text: str, base_dir: Path | None = None) -> bool:
    """xend's spellings, any case: yes/no, y/n, on/off, true/false, t/f, 1/0."""
    v = text.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"expected yes or no: {text!r}")


def _int(text: str, lo: int, hi: int, what: str = "an integer") -> int:
    t = text.strip()
    if not _DIGITS.match(t):
        raise ValueError(f"not {what}: {text!r}")
    value = int(t)
    if not lo <= value <= hi:
        raise ValueError(f"not {what} (must be {lo} to {hi}): {text!r}")
    return value


def _port(text: str, base_dir: Path) -> int:
    return _int(text, 1, 65535, "a port number")


def _int_range(lo: int, hi: int) -> ValueParser:
    def parse(text: str, base_dir: Path) -> int:
        return _int(text, lo, hi)

    return parse


def _number(text: str, lo: float, hi: float, unit: str = "") -> float:
    t = text.strip()
    if unit and t.endswith(unit):
        t = t[: -len(unit)].rstrip()
    if not _NUMBER.match(t):
        raise ValueError(f"not a number: {text!r}")
    value = float(t)
    if not lo <= value <= hi:
        raise ValueError(f"out of range (must be {lo:g} to {hi:g}): {text!r}")
    return value


def _seconds(lo: float, hi: float) -> ValueParser:
    def parse(text: str, base_dir: Path) -> float:
        return _number(text, lo, hi, "s")

    return parse


def _factor(text: str, base_dir: Path) -> float:
    return _number(text, 1.0, 1000.0)


def _size(lo: int, hi: int) -> ValueParser:
    def parse(text: str, base_dir: Path) -> int:
        try:
            value = parse_size(text)
        except ValueError:
            raise ValueError(f"not a size: {text!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"size out of range (must be {lo} to {hi} bytes): {text!r}")
        return value

    return parse


def _optional(parse: ValueParser) -> ValueParser:
    """Empty text, ``none`` or ``unlimited`` leave the setting unset."""

    def parse_optional(text: str, base_dir: Path) -> object:
        if text.strip().lower() in ("", "none", "unlimited"):
            return None
        return parse(text, base_dir)

    return parse_optional


def _rate(text: str, base_dir: Path) -> int:
    try:
        value = parse_rate(text)
    except ValueError:
        raise ValueError(f"not a rate such as 100MB/s: {text!r}") from None
    if value <= 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return value


def _store_url(text: str, base_dir: Path) -> str:
    """``etcd://h1:2379,h2:2379`` (``etcds://`` for TLS): checked now, dialled at startup."""
    from relocd.cluster.etcd import parse_store_url
    from relocd.errors import ConfigError

    try:
        parse_store_url(text)
    except ConfigError as exc:
        raise ValueError(exc.message) from None
    return text


def _cluster_name(text: str, base_dir: Path) -> str:
    if not _HOST_OR_IFACE.match(text):
        raise ValueError(f"{text!r} is not a host name")
    return text


def _path(text: str, base_dir: Path) -> Path:
    if not text.strip():
        raise ValueError("empty path")
    if "\0" in text:
        raise ValueError(f"not a path: {text!r}")
    path = Path(text)
    return path if path.is_absolute() else base_dir / path


def _choice(*choices: str) -> ValueParser:
    def parse(text: str, base_dir: Path) -> str:
        v = text.strip().lower()
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}: {text!r}")
        return v

    return parse


def _address(text: str, base_dir: Path) -> str:
    """'' (all interfaces), an IP address, a host name or an interface name."""
    t = text.strip()
    if t == "":
        return ""
    try:
        return str(ipaddress.ip_address(t.strip("[]")))
    except ValueError:
        pass
    if not _HOST_OR_IFACE.match(t):
        raise ValueError(f"not an address, host name or interface name: {text!r}")
    return t


def parse_host_port(text: str, base_dir: Path | None = None) -> tuple[str, int]:
    """``HOST:PORT``; an IPv6 address in brackets (``[::1]:9782``), as in a URL.

    HOST is an IP address or a host name; there is no "all interfaces"
    shorthand: write ``0.0.0.0`` or ``[::]`` to mean it.
    """
    t = text.strip()
    host, sep, port = t.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:9782 or [::1]:9782: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            addr = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {text!r}") from None
        return str(addr), _int(port, 1, 65535, "a port number")
    if ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:9782: {text!r}")
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        if not _HOST_OR_IFACE.match(host):
            raise ValueError(f"not an IP address or host name: {text!r}") from None
    return host, _int(port, 1, 65535, "a port number")


def parse_hosts_allow(text: str, base_dir: Path | None = None) -> tuple[str, ...]:
    """Space-separated regexes; empty pieces (double spaces) are dropped."""
    patterns = tuple(text.split())
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"bad regular expression {pattern!r}: {e}") from None
    return patterns


def _driver(text: str, base_dir: Path) -> str:
    t = text.strip()
    if not _DRIVER_NAME.match(t):
        raise ValueError(f"not a driver name: {text!r}")
    return t


# --- the table -----------------------------------------------------------

_MIB = 1 << 20
_TABLE = [
    # xend's options, xend's names.
    Option("xend-relocation-server", "relocation_server", parse_bool,
           "listen for incoming migrations on the plain TCP port"),
    Option("xend-relocation-port", "relocation_port", _port,
           "TCP port of the relocation server"),
    Option("xend-relocation-address", "relocation_address", _address,
           "address to listen on ('' = all interfaces)"),
    Option("xend-relocation-hosts-allow", "hosts_allow", parse_hosts_allow,
           "space-separated regexes of peers allowed to connect ('' = everyone)"),
    Option("xend-relocation-ssl-server", "relocation_ssl_server", parse_bool,
           "listen for incoming migrations over TLS"),
    Option("xend-relocation-ssl-port", "relocation_ssl_port", _port,
           "TCP port of the TLS relocation server"),
    Option("xend-relocation-server-ssl-key-file", "ssl_key_file", _optional(_path),
           "private key of the TLS listener (and of outgoing TLS)"),
    Option("xend-relocation-server-ssl-cert-file", "ssl_cert_file", _optional(_path),
           "certificate of the TLS listener (and of outgoing TLS)"),
    Option("xend-relocation-ssl", "relocation_ssl", parse_bool,
           "send migrations over TLS by default"),
    # relocd's own.
    Option("relocd-relocation-ssl-ca-file", "ssl_ca_file", _optional(_path),
           "CA certificates: require and verify peer certificates"),
    Option("relocd-control-socket", "control_socket", _path,
           "unix socket the relocd command talks to"),
    Option("relocd-state-dir", "state_dir", _path,
           "domain records and the migration journal"),
    Option("relocd-max-iterations", "max_iterations", _int_range(1, 10_000),
           "precopy: at most this many rounds"),
    Option("relocd-max-factor", "max_factor", _factor,
           "precopy: stop once this many times the memory was sent"),
    Option("relocd-dirty-threshold", "dirty_threshold", _int_range(0, 1 << 40),
           "precopy: stop when fewer pages than this are dirty"),
    Option("relocd-precopy-policy", "precopy_policy", _choice("downtime", "xend"),
           "when to stop precopy: downtime target or xend's rules"),
    Option("relocd-downtime-ms", "downtime_ms", _int_range(1, 3_600_000),
           "downtime target of the downtime policy"),
    Option("relocd-auto-converge", "auto_converge", parse_bool,
           "throttle a guest that dirties memory faster than the link carries it"),
    Option("relocd-max-bandwidth", "max_bandwidth", _optional(_rate),
           "bandwidth cap for outgoing migrations (e.g. 1GB/s)"),
    Option("relocd-guest-memory-dir", "guest_memory_dir", _optional(_path),
           "a tmpfs (mounted huge=always for 2 MiB pages) for sim and kvm guest memory"),
    Option("relocd-migration-channels", "migration_channels", _int_range(1, 16),
           "connections the pages of an outgoing migration are striped over"),
    Option("relocd-handshake-timeout", "handshake_timeout", _seconds(0.001, 86400),
           "seconds a peer has to complete the hello"),
    Option("relocd-idle-timeout", "idle_timeout", _seconds(0.001, 86400),
           "seconds a connection may stay silent"),
    Option("relocd-max-frame", "max_frame", _size(64 << 10, 1 << 30),
           "largest record accepted from a peer"),
    Option("relocd-max-incoming", "max_incoming", _int_range(1, 1024),
           "concurrent incoming migrations"),
    Option("relocd-reservation-timeout", "reservation_timeout", _seconds(0.001, 86400),
           "seconds a reservation lives without news from the source"),
    Option("relocd-max-memory", "max_memory", _optional(_size(_MIB, 1 << 60)),
           "memory incoming domains may use in all (unset = host's free memory)"),
    Option("relocd-dns-timeout", "dns_timeout", _seconds(0.001, 600),
           "seconds allowed for hosts-allow DNS lookups"),
    Option("relocd-announce-rounds", "announce_rounds", _int_range(0, 100),
           "gratuitous ARP / NA rounds after resume"),
    Option("relocd-announce-initial-ms", "announce_initial_ms", _int_range(0, 60_000),
           "delay before the second announce round"),
    Option("relocd-announce-step-ms", "announce_step_ms", _int_range(0, 60_000),
           "added to the delay after each announce round"),
    Option("relocd-log-format", "log_format", _choice("auto", "json", "console"),
           "log lines as JSON, for a console, or auto (console on a tty)"),
    Option("relocd-log-level", "log_level", _choice("debug", "info", "warning", "error"),
           "least severe log lines written"),
    Option("relocd-shutdown-grace", "shutdown_grace", _seconds(0, 86400),
           "seconds a stop waits for migrations in flight before cancelling them"),
    Option("relocd-default-driver", "default_driver", _driver,
           "driver of domains created without --driver"),
    Option("relocd-metrics-address", "metrics_address", _optional(parse_host_port),
           "HOST:PORT of the Prometheus endpoint (unset = off)"),
    Option("relocd-cluster-store", "cluster_store", _optional(_store_url),
           "etcd://HOST:PORT,... arbitrates handoffs and lists the fleet (unset = journal only)"),
    Option("relocd-cluster-name", "cluster_name", _optional(_cluster_name),
           "this host's name in the cluster store (unset = the host name)"),
    Option("relocd-cluster-ca-file", "cluster_ca_file", _optional(_path),
           "CA certificates of etcd's client port (TLS to etcd)"),
    Option("relocd-cluster-cert-file", "cluster_cert_file", _optional(_path),
           "client certificate shown to etcd"),
    Option("relocd-cluster-key-file", "cluster_key_file", _optional(_path),
           "private key of the etcd client certificate"),
    Option("relocd-cluster-timeout", "cluster_timeout", _seconds(0.05, 600),
           "seconds an etcd member has to answer before the next is tried"),
]  # fmt: skip

#: keyword -> option
OPTIONS: dict[str, Option] = {opt.keyword: opt for opt in _TABLE}

#: Options xend knew and relocd ignores; check-config warns about anything else.
XEND_OPTIONS = frozenset(
    """
    logfile loglevel xen-api-server xend-http-server xend-unix-server
    xend-tcp-xmlrpc-server xend-tcp-xmlrpc-server-address
    xend-tcp-xmlrpc-server-port xend-tcp-xmlrpc-server-ssl-key-file
    xend-tcp-xmlrpc-server-ssl-cert-file xend-unix-xmlrpc-server xend-port
    xend-address xend-unix-path xend-domains-path xend-state-path
    xend-storage-path xend-security-path network-script vif-script
    external-migration-tool enable-dump dom0-min-mem enable-dom0-ballooning
    dom0-cpus console-limit vnc-listen vncpasswd keymap
    resource-label-change-script vnc-tls vnc-x509-cert-dir vnc-x509-verify
    qemu-dm-logrotate-count xsm_module_name total_available_memory
    device-create-timeout device-destroy-timeout xend-domain-lock
    xend-domain-lock-path xend-domain-lock-utility pci-passthrough-strict-check
    xend-vnc-listen xend-relocation-tls xend-tcp-xmlrpc-server-ssl
    """.split()
)
