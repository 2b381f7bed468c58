"""A Xen domain's configuration: libxl's JSON to relocd's DomainConfig, and back to an xl config file.

Only what relocd needs travels in DomainConfig: name, uuid, memory, vCPUs,
network interfaces, and (in ``extra``) the guest type (``pv``, ``pvh``, ``hvm``)
and the boot triple (kernel, ramdisk, command line) so that ``create`` can
build the same domain again.  libxl keeps a PV guest's triple under
``b_info["type.pv"]`` (the old place) and a PVH guest's in ``b_info`` itself;
both are read.  The whole libxl JSON travels too (``LIBXL_JSON``): the
target restores from it, so its type (``c_info.type``) is the source's.
``disks`` are the local paths behind libxl's ``disks`` (``pdev_path``), which
the target's reservation checks it can open.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from relocd.drivers.base import DomainConfig, Vif
from relocd.errors import DriverError

DRIVER_NAME = "xen"
#: extra keys the xen driver reads and writes
KERNEL, RAMDISK, CMDLINE, TYPE, XL_CONFIG = "xen_kernel", "xen_ramdisk", "xen_cmdline", "xen_type", "xl_config"
#: libxl's whole JSON config, compact: what a stream's target restores the domain with
LIBXL_JSON = "libxl_json"
#: keys relocd sets itself in a generated xl config
_OWNED_KEYS = re.compile(r"^\s*(name|uuid|memory|maxmem|vcpus|maxvcpus)\s*=", re.MULTILINE)


def from_libxl_json(cfg: dict[str, Any]) -> DomainConfig:
    """DomainConfig from one ``xl list -l`` entry's ``config`` object."""
    c_info = cfg.get("c_info", {})
    b_info = cfg.get("b_info", {})
    extra: dict[str, str] = {TYPE: str(c_info.get("type", "pv")), LIBXL_JSON: json.dumps(cfg, separators=(",", ":"))}
    pv = b_info.get("type.pv", {})
    for key, field in ((KERNEL, "kernel"), (RAMDISK, "ramdisk"), (CMDLINE, "cmdline")):
        value = pv.get(field, b_info.get(field))
        if value:
            extra[key] = str(value)
    vifs = tuple(
        Vif(
            mac=str(nic.get("mac", "")),
            ips=tuple(str(nic["ip"]).split()) if nic.get("ip") else (),
            bridge=nic.get("bridge"),
        )
        for nic in cfg.get("nics", [])
        if nic.get("mac")
    )
    disks = tuple(
        str(disk["pdev_path"])
        for disk in cfg.get("disks", [])
        # A disk a block script attaches (iSCSI, DRBD, ...) names no local path; an empty CD drive none at all.
        if str(disk.get("pdev_path") or "").startswith("/") and not disk.get("script")
    )
    max_kb = int(b_info.get("max_memkb") or b_info.get("target_memkb") or 0)
    try:
        return DomainConfig(
            name=str(c_info["name"]),
            uuid=str(c_info["uuid"]),
            memory_mib=max(1, max_kb // 1024),
            vcpus=int(b_info.get("max_vcpus", 1)),
            driver=DRIVER_NAME,
            vifs=vifs,
            disks=disks,
            extra=extra,
        )
    except (KeyError, ValueError, ValidationError) as exc:
        raise DriverError(f"xen driver: domain config not usable by relocd: {exc}") from None


def libxl_json_for(config: DomainConfig, name: str) -> dict[str, Any] | None:
    """The libxl JSON config carried in ``config``, renamed to ``name`` (None when it has none)."""
    text = config.extra.get(LIBXL_JSON)
    if text is None:
        return None
    try:
        cfg = json.loads(text)
        cfg.setdefault("c_info", {}).update(name=name, uuid=config.uuid)
    except (ValueError, AttributeError) as exc:
        raise DriverError(f"xen driver: domain {config.name}'s libxl config is not usable: {exc}") from None
    return dict(cfg)


def to_xl_config(config: DomainConfig) -> str:
    """An xl config file for config: its own xl config text, or one built from the PV boot triple."""
    ours = [
        f'name = "{config.name}"',
        f'uuid = "{config.uuid}"',
        f"memory = {config.memory_mib}",
        f"maxmem = {config.memory_mib}",
        f"vcpus = {config.vcpus}",
    ]
    given = config.extra.get(XL_CONFIG)
    if given is not None:
        body = [line for line in given.splitlines() if not _OWNED_KEYS.match(line)]
        return "\n".join(body + ours) + "\n"
    kernel = config.extra.get(KERNEL)
    if not kernel:
        raise DriverError(
            f"xen driver: domain {config.name} has no xl config and no kernel "
            f"(set extra {XL_CONFIG!r}, or {KERNEL!r} with {RAMDISK!r} and {CMDLINE!r})"
        )
    lines = [f'type = "{config.extra.get(TYPE, "pv")}"', f"kernel = {json.dumps(kernel)}"]
    if RAMDISK in config.extra:
        lines.append(f"ramdisk = {json.dumps(config.extra[RAMDISK])}")
    if CMDLINE in config.extra:
        lines.append(f"extra = {json.dumps(config.extra[CMDLINE])}")
    if config.vifs:
        vifs = []
        for vif in config.vifs:
            parts = [f"mac={vif.mac}"] + ([f"bridge={vif.bridge}"] if vif.bridge else [])
            if vif.ips:
                parts.append("ip=" + " ".join(vif.ips))
            vifs.append(json.dumps(",".join(parts)))
        lines.append(f"vif = [{', '.join(vifs)}]")
    return "\n".join(lines + ours) + "\n"
