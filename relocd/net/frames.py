"""Ethernet frames a domain sends to say "I am here now" (pure, no I/O).

After a migration the domain's MAC sits behind a different switch port.
Bridges and switches only move their forwarding entry when they see a frame
*from* that MAC arrive on the new port, and peers only update their neighbour
caches when told.  These two frames do both, for IPv4 and IPv6:

* ``gratuitous_arp``: an ARP *request* (op 1) broadcast with sender IP ==
  target IP == the domain's address and an all-zero target MAC.  This is the
  "ARP Announcement" of RFC 5227 section 3 and what a Linux guest sends itself
  on resume (``netdev_notify_peers`` -> ``arp_send(ARPOP_REQUEST, ...)``), as
  asked by virtio-net's GUEST_ANNOUNCE after a QEMU migration, and what Xen's
  netfront ``send_fake_arp`` sends.  We use a request rather than a reply
  because every stack processes requests (some ignore unsolicited replies),
  and Linux updates an existing neighbour entry from either.
* ``unsolicited_na``: an ICMPv6 Neighbour Advertisement (RFC 4861 section
  7.2.6) to all-nodes ``ff02::1`` with Override set and Solicited clear,
  carrying the target link-layer address option, so that neighbours replace a
  cached MAC.  Its IPv6 source is the advertised address itself (an address
  assigned to the sending interface, as RFC 4861 requires); we do not know
  the guest's link-local address.

Both are padded to the 60-byte Ethernet minimum (the FCS is the NIC's job), as
QEMU pads its own announce frames.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ARP_OP_REQUEST = 1
ICMPV6_NEIGHBOUR_ADVERT = 136
ND_OPT_TARGET_LINKADDR = 2
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000
IPPROTO_ICMPV6 = 58
ND_HOP_LIMIT = 255  # RFC 4861: receivers drop ND packets with any other hop limit
ETH_MIN_FRAME = 60  # without the 4-byte FCS

BROADCAST_MAC = b"\xff" * 6
ALL_NODES_MAC = bytes.fromhex("333300000001")  # 33:33 + low 32 bits of ff02::1
ALL_NODES_IP6 = ipaddress.IPv6Address("ff02::1")

ETH_HEADER = struct.Struct("!6s6sH")
ARP_IPV4 = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen op sha spa tha tpa
IPV6_HEADER = struct.Struct("!IHBB16s16s")  # ver/tc/flow, payload len, next hdr, hop limit, src, dst
ICMPV6_NA = struct.Struct("!BBHI16s")  # type code checksum flags target
ND_OPT_LINKADDR = struct.Struct("!BB6s")  # type, length in 8-byte units, MAC
IPV6_PSEUDO_HEADER = struct.Struct("!16s16sI3xB")  # src dst upper-layer length, zero, next hdr

_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")


def mac_bytes(mac: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (or with dashes) -> 6 bytes; ValueError otherwise."""
    if not _MAC_RE.match(mac):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def _pad(frame: bytes) -> bytes:
    return frame.ljust(ETH_MIN_FRAME, b"\0")


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum of 16-bit words, complemented."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def gratuitous_arp(mac: str, ip: str) -> bytes:
    """Broadcast ARP announcement (request, sender IP == target IP == ``ip``)."""
    sha = mac_bytes(mac)
    addr = ipaddress.IPv4Address(ip).packed
    eth = ETH_HEADER.pack(BROADCAST_MAC, sha, ETH_P_ARP)
    arp = ARP_IPV4.pack(1, 0x0800, 6, 4, ARP_OP_REQUEST, sha, addr, b"\0" * 6, addr)
    return _pad(eth + arp)


def unsolicited_na(mac: str, ip6: str) -> bytes:
    """Unsolicited Neighbour Advertisement for ``ip6`` to all-nodes, Override set."""
    lladdr = mac_bytes(mac)
    target = ipaddress.IPv6Address(ip6)
    if target.is_multicast or target.is_unspecified:
        raise ValueError(f"cannot advertise {ip6}: not a unicast address")
    src = target.packed
    dst = ALL_NODES_IP6.packed
    option = ND_OPT_LINKADDR.pack(ND_OPT_TARGET_LINKADDR, 1, lladdr)
    unsummed = ICMPV6_NA.pack(ICMPV6_NEIGHBOUR_ADVERT, 0, 0, NA_FLAG_OVERRIDE, src) + option
    pseudo = IPV6_PSEUDO_HEADER.pack(src, dst, len(unsummed), IPPROTO_ICMPV6)
    checksum = internet_checksum(pseudo + unsummed)
    icmp = unsummed[:2] + struct.pack("!H", checksum) + unsummed[4:]
    ip6_header = IPV6_HEADER.pack(6 << 28, len(icmp), IPPROTO_ICMPV6, ND_HOP_LIMIT, src, dst)
    eth = ETH_HEADER.pack(ALL_NODES_MAC, lladdr, ETH_P_IPV6)
    return _pad(eth + ip6_header + icmp)


def announce_frames(mac: str, ips: Iterable[str]) -> list[bytes]:
    """One announce frame per address: GARP for IPv4, unsolicited NA for IPv6.

    Addresses may carry a prefix length (``10.0.0.5/24``), as vif configs do.
    """
    frames = []
    for ip in ips:
        addr = ipaddress.ip_interface(ip).ip
        if addr.version == 4:
            frames.append(gratuitous_arp(mac, str(addr)))
        else:
            frames.append(unsolicited_na(mac, str(addr)))
    return frames
