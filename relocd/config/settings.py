"""Settings: the daemon's whole configuration as one frozen model.

``load_settings`` reads an sxp file shaped like ``xend-config.sxp`` (a
sequence of ``(keyword value)`` forms) and applies command-line overrides.
xend's habits are kept so an existing ``xend-config.sxp`` loads unchanged:
the first occurrence of a repeated option wins, options relocd does not use
are ignored.  A ``relocd-`` keyword we do not know is an error: it can only
be a typo of one of ours.  Every error reads ``FILE line N: reason``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from relocd.config.sxp import SxpList, parse
from relocd.config.options import OPTIONS, RELOCD_PREFIX, XEND_OPTIONS, parse_hosts_allow
from relocd.errors import ConfigError

__all__ = ["Settings", "load_settings", "check_config", "review_config", "MAX_CONFIG_BYTES"]

#: A config file larger than this is certainly not one.
MAX_CONFIG_BYTES = 1 << 20


class Settings(BaseModel):
    """Everything the daemon reads from its config file (and the command line).

    Field defaults are the option defaults: xend's for ``xend-*`` options.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # xend's options
    relocation_server: bool = False
    relocation_port: int = Field(default=8002, ge=1, le=65535)
    relocation_address: str = ""
    hosts_allow: tuple[str, ...] = ()
    relocation_ssl_server: bool = False
    relocation_ssl_port: int = Field(default=8003, ge=1, le=65535)
    ssl_key_file: Path | None = None
    ssl_cert_file: Path | None = None
    relocation_ssl: bool = False
    # relocd's own
    ssl_ca_file: Path | None = None
    control_socket: Path = Path("/run/relocd/control.sock")
    state_dir: Path = Path("/var/lib/relocd")
    max_iterations: int = Field(default=29, ge=1)
    max_factor: float = Field(default=3.0, ge=1.0)
    dirty_threshold: int = Field(default=50, ge=0)
    precopy_policy: Literal["downtime", "xend"] = "downtime"
    downtime_ms: int = Field(default=20, ge=1)
    #: throttle a guest that dirties memory faster than the link carries it (engine/converge.py)
    auto_converge: bool = True
    max_bandwidth: int | None = Field(default=None, gt=0)
    #: relocd-guest-memory-dir: a tmpfs for guest memory files (mount it huge=always: docs/memory.md)
    guest_memory_dir: Path | None = None
    #: page channels of an outgoing migration (4 measured fastest of 1, 2, 4 on 2 cores: docs/memory.md)
    migration_channels: int = Field(default=4, ge=1, le=16)
    handshake_timeout: float = Field(default=10.0, gt=0)
    idle_timeout: float = Field(default=60.0, gt=0)
    max_frame: int = Field(default=16 << 20, ge=64 << 10, le=1 << 30)
    max_incoming: int = Field(default=4, ge=1)
    reservation_timeout: float = Field(default=30.0, gt=0)
    max_memory: int | None = Field(default=None, gt=0)
    dns_timeout: float = Field(default=2.0, gt=0)
    announce_rounds: int = Field(default=5, ge=0)
    announce_initial_ms: int = Field(default=50, ge=0)
    announce_step_ms: int = Field(default=100, ge=0)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: relocd-shutdown-grace: how long a stop lets migrations in flight finish
    shutdown_grace: float = Field(default=30.0, ge=0)
    default_driver: str = "sim"
    #: relocd-metrics-address: (host, port) of the Prometheus endpoint; None = off
    metrics_address: tuple[str, int] | None = None
    #: relocd-cluster-store: etcd endpoints (docs/cluster.md); None = journal only
    cluster_store: str | None = None
    #: relocd-cluster-name: this host in the store; None = socket.gethostname()
    cluster_name: str | None = None
    cluster_ca_file: Path | None = None
    cluster_cert_file: Path | None = None
    cluster_key_file: Path | None = None
    cluster_timeout: float = Field(default=2.0, gt=0)
    #: The file these settings came from (None: defaults only).
    config_file: Path | None = None

    @classmethod
    def default(cls) -> Settings:
        """All defaults, no file."""
        return cls()

    @field_validator("hosts_allow", mode="before")
    @classmethod
    def _split_hosts_allow(cls, v: Any) -> Any:
        """Accept the option's text form and drop empty pieces (xend's double-space quirk)."""
        if isinstance(v, str):
            return parse_hosts_allow(v)
        if isinstance(v, (list, tuple)):
            return parse_hosts_allow(" ".join(str(p) for p in v))
        return v

    @field_validator("relocation_address")
    @classmethod
    def _address_ok(cls, v: str) -> str:
        return str(OPTIONS["xend-relocation-address"].parse(v, Path(".")))

    @field_validator("default_driver")
    @classmethod
    def _driver_ok(cls, v: str) -> str:
        return str(OPTIONS["relocd-default-driver"].parse(v, Path(".")))


@dataclass
class _Scan:
    """What one pass over a config file found."""

    filename: str
    values: dict[str, object] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: None: the first error raises; a list: every error is kept here (check-config)
    errors: list[str] | None = None

    def where(self, line: int) -> str:
        return f"{self.filename} line {line}"

    def fail(self, message: str) -> None:
        if self.errors is None:
            raise ConfigError(message)
        self.errors.append(message)


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes, not a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text") from None


def _scan(text: str, filename: str, base_dir: Path, *, every_error: bool = False) -> _Scan:
    """Walk the top-level forms; raise on the first error (or keep them all), collect warnings."""
    scan = _Scan(filename, errors=[] if every_error else None)
    for item in parse(text, filename):
        if not isinstance(item, SxpList):
            scan.warnings.append(f"{filename}: stray value {item!r} outside any (option value) ignored")
            continue
        where = scan.where(item.line)
        if not item or not isinstance(item[0], str):
            scan.warnings.append(f"{where}: form without an option name ignored")
            continue
        keyword = item[0]
        opt = OPTIONS.get(keyword)
        if opt is None:
            if keyword.startswith(RELOCD_PREFIX):
                hint = _suggest(keyword, list(OPTIONS))
                scan.fail(f"{where}: unknown option {keyword!r}{hint}")
                continue
            if keyword not in XEND_OPTIONS:
                hint = _suggest(keyword, list(OPTIONS) + sorted(XEND_OPTIONS))
                scan.warnings.append(f"{where}: unknown option {keyword!r} ignored{hint}")
            continue
        if opt.field in scan.values:
            first = scan.lines[opt.field]
            scan.warnings.append(
                f"{where}: {keyword} repeated; the first one (line {first}) wins, as in xend"
            )
            continue
        args = item[1:]
        if len(args) != 1 or not isinstance(args[0], str):
            hint = " (quote a value that has spaces)" if len(args) > 1 else ""
            if any(isinstance(a, str) and a.startswith(("[", "]")) for a in args):
                hint = " (quote a value that has brackets, e.g. '[::1]:9782')"
            scan.fail(f"{where}: {keyword}: expected one value, got {len(args)}{hint}")
            continue
        if opt.field == "hosts_allow" and args[0].strip() and "" in args[0].split(" "):
            scan.warnings.append(
                f"{where}: {keyword}: empty pattern (double or outer space) ignored; "
                "xend read it as 'allow everyone'"
            )
        try:
            scan.values[opt.field] = opt.parse(args[0], base_dir)
        except ValueError as e:
            scan.fail(f"{where}: {keyword}: {e}")
        scan.lines[opt.field] = item.line
    return scan


def _one_line(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "settings"
    return f"{where}: {loc}: {first['msg']}"


def _scan_file(path: Path) -> tuple[_Scan, Settings]:
    scan = _scan(_read_text(path), str(path), path.absolute().parent)
    try:
        settings = Settings.model_validate({**scan.values, "config_file": path})
    except ValidationError as e:  # the option parsers should have caught it
        raise ConfigError(_one_line(e, str(path))) from None
    return scan, settings


def load_settings(path: Path | None, overrides: dict[str, object] | None = None) -> Settings:
    """Read ``path`` (None: defaults only), then apply command-line overrides.

    ``overrides`` maps field names to values (``{"relocation_port": 8102}``);
    a None value means "not given on the command line".
    """
    settings = Settings() if path is None else _scan_file(path)[1]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not given:
        return settings
    unknown = sorted(set(given) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"command line: unknown setting {unknown[0]!r}")
    try:
        return Settings.model_validate({**settings.model_dump(), **given})
    except ValidationError as e:
        raise ConfigError(_one_line(e, "command line")) from None


# --- check-config --------------------------------------------------------

#: An unescaped '.' between name characters, as in ^10.0.0.1$ (matches any character).
_LOOSE_DOT = re.compile(r"(?<=[A-Za-z0-9])(?<!\\)\.(?=[A-Za-z0-9])")


def _hosts_allow_warnings(patterns: tuple[str, ...], where: str) -> list[str]:
    warnings = []
    for p in patterns:
        if not (p.endswith("$") and not p.endswith("\\$")) and not p.endswith("\\Z"):
            warnings.append(
                f"{where}: xend-relocation-hosts-allow: {p!r} is not anchored with '$' "
                "and also matches longer names and addresses"
            )
        if _LOOSE_DOT.search(p):
            warnings.append(
                f"{where}: xend-relocation-hosts-allow: in {p!r} an unescaped '.' "
                "matches any character; write '\\\\.' in the file"
            )
    return warnings


def _file_warnings(s: Settings, scan: _Scan) -> list[str]:
    warnings = []
    for name, opt_keyword in (
        ("ssl_key_file", "xend-relocation-server-ssl-key-file"),
        ("ssl_cert_file", "xend-relocation-server-ssl-cert-file"),
        ("ssl_ca_file", "relocd-relocation-ssl-ca-file"),
    ):
        p = getattr(s, name)
        if p is not None and not p.exists():
            line = scan.lines.get(name, 0)
            warnings.append(f"{scan.where(line)}: {opt_keyword}: {p} does not exist")
    if s.relocation_ssl_server and (s.ssl_key_file is None or s.ssl_cert_file is None):
        warnings.append(
            f"{scan.filename}: xend-relocation-ssl-server is on but the server's "
            "ssl key or cert file is not set: the TLS listener cannot start"
        )
    return warnings


def review_config(path: Path) -> tuple[Settings | None, list[str], list[str]]:
    """check-config: every error and warning in ``path``, not only the first.

    Returns (settings, errors, warnings).  An option whose value is bad keeps
    its default in ``settings``, so later checks (TLS files, addresses) still
    run on the rest; settings is None when the file cannot be read or parsed
    at all.  A repeated option's later values are not checked (the first one
    wins, as in xend).
    """
    try:
        scan = _scan(_read_text(path), str(path), path.absolute().parent, every_error=True)
    except ConfigError as e:  # unreadable, or not sxp: nothing more can be said
        return None, [e.message], []
    errors = list(scan.errors or [])
    try:
        settings: Settings | None = Settings.model_validate({**scan.values, "config_file": path})
    except ValidationError as e:  # the option parsers should have caught it
        settings = None
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            errors.append(f"{path}: {loc}: {err['msg']}")
    warnings = list(scan.warnings)
    if settings is not None:
        if "hosts_allow" in scan.lines:
            warnings += _hosts_allow_warnings(settings.hosts_allow, scan.where(scan.lines["hosts_allow"]))
        warnings += _listen_warnings(settings, scan)
    return settings, errors, warnings


def _listen_warnings(s: Settings, scan: _Scan) -> list[str]:
    if not s.relocation_server and not s.relocation_ssl_server:
        return [
            f"{scan.filename}: xend-relocation-server and xend-relocation-ssl-server are "
            "both off: this host will not accept incoming migrations"
        ]
    if not s.hosts_allow:
        return [
            f"{scan.filename}: xend-relocation-hosts-allow is empty: "
            "every host that can reach the relocation port may migrate domains here"
        ]
    return []


def check_config(path: Path) -> list[str]:
    """Load ``path`` as the daemon would; raise ConfigError on errors, return warnings."""
    scan, s = _scan_file(path)
    warnings = list(scan.warnings)
    if "hosts_allow" in scan.lines:
        warnings += _hosts_allow_warnings(s.hosts_allow, scan.where(scan.lines["hosts_allow"]))
    warnings += _file_warnings(s, scan)
    return warnings + _listen_warnings(s, scan)
