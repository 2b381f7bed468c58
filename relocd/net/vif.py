"""Network interfaces for sim/kvm domains: a veth pair and a namespace per domain.

A sim or kvm domain has no network stack of its own, so its vif is a Linux
network namespace that stands in for the guest: the guest end of a veth pair
lives there with the domain's MAC and addresses (so the domain really answers
ARP, ND and ping), and the host end, named after the domain, is a port of the
configured bridge in the daemon's own namespace -- as Xen's ``vifD.N`` is a
port of ``xenbr0``.

* ``set_link(h, False)`` takes the guest end down while the domain is paused
  (a paused domain must not answer); ``set_link(h, True)`` on resume.
* ``announce_vif`` sends the announce from the guest end inside the domain's
  namespace, so the frames enter the local bridge through the domain's own
  port and every bridge on the way (the local one included) learns the MAC
  there; see docs/network.md.
* A vif with no IPv6 address gets IPv6 disabled on its guest end: the kernel
  would otherwise send MLD reports on every link-up, an accidental announce a
  real migrated guest does not make.

Namespaces are named ``<netns_prefix>-<domain>`` so two daemons on one machine
(two lab hosts) never share one.  All calls are synchronous ``ip`` runs of a
few milliseconds each; the daemon may wrap them in ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass

from relocd.drivers.base import INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX, Vif
from relocd.errors import DriverError, Reason
from relocd.net.announce import AnnounceConfig, AnnounceResult, announce, call_in_netns
from relocd.net.frames import mac_bytes

IFNAMSIZ = 15  # usable characters in a Linux interface name
_IFNAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class VifHandle:
    """Everything needed to find a vif again (it survives in the kernel, not in us)."""

    domain_name: str
    mac: str
    ips: tuple[str, ...]
    bridge: str | None
    netns: str  # the domain's namespace, holding the guest end
    guest_ifname: str
    host_ifname: str
    host_netns: str | None = None  # None: the daemon's own namespace


def base_domain_name(name: str) -> str:
    """The name without the ``--incoming`` / ``--migratedaway`` marks a move adds."""
    for suffix in (INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def vif_names(domain_name: str, mac: str, netns_prefix: str) -> tuple[str, str, str]:
    """(domain namespace, host end, guest end) for one vif; pure and stable.

    The host end reads ``<domain>.<hash>``: the domain name cut to fit 15
    characters, plus 4 hex digits of (prefix, domain, MAC) so two daemons or
    two vifs of one domain never pick the same name.
    """
    name = base_domain_name(domain_name)
    mac_hex = mac_bytes(mac).hex()
    digest = hashlib.blake2s(f"{netns_prefix}/{name}/{mac_hex}".encode(), digest_size=2).hexdigest()
    stem = _IFNAME_UNSAFE.sub("_", name)[: IFNAMSIZ - 5]
    host = f"{stem}.{digest}"
    guest = f"v{mac_hex}"
    netns = f"{netns_prefix}-{name}" if netns_prefix else name
    return netns, host, guest


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DriverError(f"vif: cannot run ip: {exc}", reason=Reason.NETWORK) from None
    if check and proc.returncode:
        detail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise DriverError(f"vif: ip {' '.join(args)}: {detail}", reason=Reason.NETWORK)
    return proc


def _write_sysctl(netns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/", 4)  # net.ipv6.conf.<ifname>.<knob>

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    try:
        call_in_netns(netns, write)
    except OSError as exc:
        raise DriverError(f"vif: cannot set {key} in {netns}: {exc.strerror}", reason=Reason.NETWORK) from None


def _with_prefix(ip: str) -> str:
    """An address as the guest end carries it: a bare address becomes a host route (/32, /128)."""
    iface = ipaddress.ip_interface(ip)
    return str(iface) if "/" in ip else f"{iface.ip}/{iface.ip.max_prefixlen}"


def vif_handle(
    domain_name: str, vif: Vif, *, netns_prefix: str, host_netns: str | None = None
) -> VifHandle:
    """The handle of a vif, made or not (a restarted daemon finds its vifs this way)."""
    netns, host, guest = vif_names(domain_name, vif.mac, netns_prefix)
    return VifHandle(
        base_domain_name(domain_name), vif.mac, tuple(vif.ips), vif.bridge, netns, guest, host, host_netns
    )


def attach_vif(
    domain_name: str, vif: Vif, *, netns_prefix: str, up: bool = True, host_netns: str | None = None
) -> VifHandle:
    """Create the vif (replacing a stale one of the same name); guest end up if ``up``.

    ``up=False`` is for a domain built paused (incoming migration, restore).
    ``host_netns`` puts the host end elsewhere than the daemon's namespace (tests).
    """
    handle = vif_handle(domain_name, vif, netns_prefix=netns_prefix, host_netns=host_netns)
    if vif.bridge and _ip("link", "show", "dev", vif.bridge, netns=host_netns, check=False).returncode:
        raise DriverError(f"vif {vif.mac} of {domain_name}: no bridge {vif.bridge}", reason=Reason.NETWORK)
    detach_vif(handle)
    try:
        _build(handle)
        if up:
            set_link(handle, True)
    except BaseException:
        detach_vif(handle)
        raise
    return handle


def _build(h: VifHandle) -> None:
    _ip("netns", "add", h.netns)
    _ip("link", "set", "lo", "up", netns=h.netns)
    _ip("link", "add", h.host_ifname, "type", "veth", "peer", "name", h.guest_ifname,
        "netns", h.netns, netns=h.host_netns)
    has_v6 = any(ipaddress.ip_interface(a).version == 6 for a in h.ips)
    conf = f"net.ipv6.conf.{h.guest_ifname}"
    if has_v6:
        _write_sysctl(h.netns, f"{conf}.keep_addr_on_down", "1")  # addresses survive a pause
        _write_sysctl(h.netns, f"{conf}.accept_ra", "0")
    else:
        _write_sysctl(h.netns, f"{conf}.disable_ipv6", "1")  # silent: no MLD on link-up
    _ip("link", "set", h.guest_ifname, "address", h.mac, "addrgenmode", "none", netns=h.netns)
    for addr in h.ips:
        extra = ("nodad",) if ipaddress.ip_interface(addr).version == 6 else ()
        _ip("addr", "replace", _with_prefix(addr), "dev", h.guest_ifname, *extra, netns=h.netns)
    host_args = ["link", "set", h.host_ifname, "addrgenmode", "none"]
    if h.bridge:
        host_args += ["master", h.bridge]
    _ip(*host_args, "up", netns=h.host_netns)


def set_link(handle: VifHandle, up: bool) -> None:
    """Guest end up (resume) or down (pause); the routes an up link needs are re-added."""
    h = handle
    _ip("link", "set", h.guest_ifname, "up" if up else "down", netns=h.netns)
    if not up:
        return
    versions = {ipaddress.ip_interface(a).version for a in h.ips}
    for version in sorted(versions):
        # on-link default route: the guest reaches any address on its segment
        _ip(f"-{version}", "route", "replace", "default", "dev", h.guest_ifname, netns=h.netns)


def detach_vif(handle: VifHandle) -> None:
    """Destroy the vif and the domain's namespace; a no-op when already gone."""
    h = handle
    if os.path.exists(f"/run/netns/{h.netns}"):
        _ip("link", "del", h.guest_ifname, netns=h.netns, check=False)  # takes the host end too
        _ip("netns", "del", h.netns, check=False)
    if h.host_netns is None or os.path.exists(f"/run/netns/{h.host_netns}"):
        _ip("link", "del", h.host_ifname, netns=h.host_netns, check=False)


async def announce_vif(handle: VifHandle, cfg: AnnounceConfig | None = None) -> AnnounceResult:
    """Announce the domain from inside its namespace, through its own bridge port."""
    return await announce(handle.guest_ifname, handle.mac, handle.ips, cfg, netns=handle.netns)
