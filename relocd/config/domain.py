"""A domain's configuration as sxp text: the CONFIG record and savefiles.

The text comes from peers we may not trust, so ``config_from_sxp`` is strict
(every field known, at most once, sizes bounded) and raises nothing but
:class:`ConfigError`.  The shape follows xend's domain sxp::

    (domain (name web1) (uuid 6f1c...) (memory 256) (vcpus 1) (driver sim)
            (workload 'hotset:size=64MiB,rate=100MB/s')
            (vif (mac 00:16:3e:01:02:03) (ip 10.0.0.5) (ip fd00::5) (bridge xenbr0))
            (cpu_features sse2 avx2)
            (extra (key value)))
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable

from pydantic import ValidationError

from relocd.config.sxp import SxpInput, SxpList, dumps, parse
from relocd.drivers.base import DomainConfig, Vif
from relocd.errors import ConfigError

__all__ = [
    "config_to_sxp",
    "config_from_sxp",
    "parse_vif_spec",
    "format_vif_spec",
    "MAX_CONFIG_TEXT",
]

#: Longest domain config text accepted from a peer or a savefile.
MAX_CONFIG_TEXT = 256 << 10
_MAX_VIFS = 64
_MAX_IPS = 64
_MAX_FEATURES = 1024
_MAX_EXTRA = 256

_SOURCE = "domain config"
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}\Z")
_BRIDGE = re.compile(r"[A-Za-z0-9_.:-]{1,15}\Z")
_DECIMAL = re.compile(r"[0-9]{1,12}\Z")
_FEATURE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
#: Keys of xm's vif spec that relocd has no use for; accepted and ignored.
_XEN_VIF_KEYS = frozenset(
    "script type vifname model rate backend accel uuid sec_label vlan "
    "devid ip6 trusted policy".split()
)


# --- field checks ---------------------------------------------------------


def _check_mac(text: str) -> str:
    if not _MAC.match(text):
        raise ValueError(f"not a MAC address: {text!r}")
    if int(text[:2], 16) & 1:
        raise ValueError(f"multicast MAC address for a vif: {text!r}")
    return text.lower()


def _check_ip(text: str) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        raise ValueError(f"scoped IP address for a vif: {text!r}")
    return str(addr)


def _check_bridge(text: str) -> str:
    if not _BRIDGE.match(text):
        raise ValueError(f"not a bridge name: {text!r}")
    return text


def _random_mac() -> str:
    """A locally unique MAC in Xen's OUI, as xend made them up."""
    tail = [random.randint(0x00, 0x7F), random.randint(0x00, 0xFF), random.randint(0x00, 0xFF)]
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in tail)


# --- DomainConfig -> sxp --------------------------------------------------


def _vif_sxp(vif: Vif) -> list[SxpInput]:
    out: list[SxpInput] = ["vif", ["mac", vif.mac]]
    out += [["ip", ip] for ip in vif.ips]
    if vif.bridge is not None:
        out.append(["bridge", vif.bridge])
    return out


def config_to_sxp(cfg: DomainConfig) -> str:
    """One line of sxp that ``config_from_sxp`` reads back into an equal config."""
    out: list[SxpInput] = [
        "domain",
        ["name", cfg.name],
        ["uuid", cfg.uuid],
        ["memory", cfg.memory_mib],
        ["vcpus", cfg.vcpus],
        ["driver", cfg.driver],
        ["workload", cfg.workload],
    ]
    out += [_vif_sxp(v) for v in cfg.vifs]
    if cfg.cpu_features:
        out.append(["cpu_features", *cfg.cpu_features])
    if cfg.extra:
        out.append(["extra", *([k, v] for k, v in sorted(cfg.extra.items()))])
    return dumps(out)


# --- sxp -> DomainConfig --------------------------------------------------


class _Fields:
    """The ``(key value...)`` children of one form, each key at most once."""

    def __init__(self, form: SxpList, allowed: set[str], repeatable: set[str]) -> None:
        self.by_key: dict[str, list[SxpList]] = {}
        for child in form[1:]:
            if not isinstance(child, SxpList) or not child or not isinstance(child[0], str):
                raise _error(form.line, f"({form[0]} ...): expected (key value) forms only")
            key = child[0]
            if key not in allowed:
                raise _error(child.line, f"({form[0]} ...): unknown field {key!r}")
            if key in self.by_key and key not in repeatable:
                raise _error(child.line, f"({form[0]} ...): field {key!r} given twice")
            self.by_key.setdefault(key, []).append(child)

    def atom(self, key: str) -> str | None:
        forms = self.by_key.get(key)
        if not forms:
            return None
        return _single_atom(forms[0])


def _error(line: int, reason: str) -> ConfigError:
    return ConfigError(f"{_SOURCE} line {line}: {reason}")


def _single_atom(form: SxpList) -> str:
    value = form[1] if len(form) == 2 else None
    if not isinstance(value, str):
        raise _error(form.line, f"({form[0]} ...): expected exactly one value")
    return value


def _atoms(form: SxpList) -> list[str]:
    out: list[str] = []
    for item in form[1:]:
        # Accept (cpu_features a b) and (cpu_features (a b)).
        for atom in item if isinstance(item, SxpList) else [item]:
            if not isinstance(atom, str):
                raise _error(form.line, f"({form[0]} ...): expected plain values")
            out.append(atom)
    return out


def _checked(line: int, what: str, check: Callable[[str], str], text: str) -> str:
    """Validate ``text``; return it unchanged so a config round-trips exactly."""
    try:
        check(text)
    except ValueError as e:
        raise _error(line, f"{what}: {e}") from None
    return text


def _vif_from_sxp(form: SxpList) -> Vif:
    fields = _Fields(form, {"mac", "ip", "bridge"}, repeatable={"ip"})
    mac = fields.atom("mac")
    if mac is None:
        raise _error(form.line, "vif: no mac")
    ip_forms = fields.by_key.get("ip", [])
    if len(ip_forms) > _MAX_IPS:
        raise _error(form.line, f"vif: more than {_MAX_IPS} IP addresses")
    ips = tuple(_checked(f.line, "vif ip", _check_ip, _single_atom(f)) for f in ip_forms)
    bridge = fields.atom("bridge")
    return Vif(
        mac=_checked(form.line, "vif mac", _check_mac, mac),
        ips=ips,
        bridge=None if bridge is None else _checked(form.line, "vif bridge", _check_bridge, bridge),
    )


def _int_field(fields: _Fields, key: str) -> int | None:
    text = fields.atom(key)
    if text is None:
        return None
    if not _DECIMAL.match(text):
        raise _error(fields.by_key[key][0].line, f"{key}: not a number: {text[:40]!r}")
    return int(text)


def _extra(form: SxpList) -> dict[str, str]:
    if len(form) - 1 > _MAX_EXTRA:
        raise _error(form.line, f"extra: more than {_MAX_EXTRA} entries")
    out: dict[str, str] = {}
    for item in form[1:]:
        if not (isinstance(item, SxpList) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise _error(form.line, "extra: expected (key value) pairs")
        key, value = str(item[0]), str(item[1])
        if key in out:
            raise _error(item.line, f"extra: key {key!r} given twice")
        out[key] = value
    return out


_DOMAIN_FIELDS = {"name", "uuid", "memory", "vcpus", "driver", "workload", "vif", "cpu_features", "extra"}


def config_from_sxp(text: str) -> DomainConfig:
    """Read a ``(domain ...)`` form; anything malformed raises ConfigError."""
    if len(text) > MAX_CONFIG_TEXT:
        raise ConfigError(f"{_SOURCE}: longer than {MAX_CONFIG_TEXT} characters")
    values = parse(text, _SOURCE)
    if len(values) != 1 or not isinstance(values[0], SxpList):
        raise ConfigError(f"{_SOURCE}: expected exactly one (domain ...) form")
    form = values[0]
    if not form or form[0] != "domain":
        raise _error(form.line, "expected a (domain ...) form")
    fields = _Fields(form, _DOMAIN_FIELDS, repeatable={"vif"})
    vif_forms = fields.by_key.get("vif", [])
    if len(vif_forms) > _MAX_VIFS:
        raise _error(form.line, f"more than {_MAX_VIFS} vifs")
    features: list[str] = []
    for f in fields.by_key.get("cpu_features", []):
        features = [_checked(f.line, "cpu_features", _check_feature, a) for a in _atoms(f)]
        if len(features) > _MAX_FEATURES:
            raise _error(f.line, f"cpu_features: more than {_MAX_FEATURES}")
    raw: dict[str, object] = {
        "name": fields.atom("name"),
        "uuid": fields.atom("uuid"),
        "memory_mib": _int_field(fields, "memory"),
        "vcpus": _int_field(fields, "vcpus"),
        "driver": fields.atom("driver"),
        "workload": fields.atom("workload"),
        "vifs": tuple(_vif_from_sxp(v) for v in vif_forms),
        "cpu_features": tuple(features),
        "extra": _extra(fields.by_key["extra"][0]) if "extra" in fields.by_key else {},
    }
    if raw["name"] is None:
        raise _error(form.line, "no name")
    if raw["uuid"] is None:
        raise _error(form.line, "no uuid")
    if raw["memory_mib"] is None:
        raise _error(form.line, "no memory")
    try:
        return DomainConfig.model_validate({k: v for k, v in raw.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "domain"
        raise _error(form.line, f"{loc}: {first['msg']}") from None
    except (ValueError, TypeError) as e:  # pragma: no cover - pydantic wraps these
        raise _error(form.line, str(e)) from None


def _check_feature(text: str) -> str:
    if not _FEATURE.match(text):
        raise ValueError(f"not a CPU feature name: {text[:40]!r}")
    return text


# --- xm's vif spec ----------------------------------------------------------


def parse_vif_spec(text: str) -> Vif:
    """Read an xm-style vif string: ``'mac=00:16:3e:01:02:03, ip=10.0.0.5 fd00::5, bridge=xenbr0'``.

    Several IPs are space separated; a missing mac gets a random one in Xen's
    OUI (as xend did); keys xm knew but relocd does not use are ignored.
    """
    seen: dict[str, str] = {}
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        key, eq, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise ConfigError(f"vif {text!r}: expected key=value, got {piece!r}")
        if key in seen:
            raise ConfigError(f"vif {text!r}: {key} given twice")
        if key not in ("mac", "ip", "bridge") and key not in _XEN_VIF_KEYS:
            raise ConfigError(f"vif {text!r}: unknown key {key!r}")
        seen[key] = value
    try:
        mac = _check_mac(seen["mac"]) if "mac" in seen else _random_mac()
        ips = tuple(_check_ip(ip) for ip in seen.get("ip", "").split())
        bridge = _check_bridge(seen["bridge"]) if "bridge" in seen else None
    except ValueError as e:
        raise ConfigError(f"vif {text!r}: {e}") from None
    return Vif(mac=mac, ips=ips, bridge=bridge)


def format_vif_spec(vif: Vif) -> str:
    """The inverse of ``parse_vif_spec``, for display and ``xm``-style configs."""
    parts = [f"mac={vif.mac}"]
    if vif.ips:
        parts.append("ip=" + " ".join(vif.ips))
    if vif.bridge is not None:
        parts.append(f"bridge={vif.bridge}")
    return ", ".join(parts)
