"""Announce frames byte for byte (checksums verified independently), the
announce schedule and its failure reporting, and vif naming."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from relocd.net.announce import AnnounceConfig, announce
from relocd.net.frames import (
    announce_frames,
    gratuitous_arp,
    internet_checksum,
    mac_bytes,
    unsolicited_na,
)
from relocd.net.vif import base_domain_name, vif_names

MAC = "52:54:00:12:34:56"


def ones_complement_ok(data: bytes) -> bool:
    """Independent check: a correct Internet checksum makes the whole message
    sum to 0xffff in one's complement, i.e. the message read as one big
    integer is 0 modulo 0xffff (because 2**16 == 1 mod 0xffff)."""
    if len(data) % 2:
        data += b"\0"
    return int.from_bytes(data, "big") % 0xFFFF == 0


def test_gratuitous_arp_exact_bytes() -> None:
    expected = bytes.fromhex(
        "ffffffffffff"  # Ethernet dst: broadcast
        "525400123456"  # Ethernet src: the domain
        "0806"  # ethertype ARP
        "0001" "0800" "06" "04"  # Ethernet / IPv4, address lengths 6 and 4
        "0001"  # op 1: request (RFC 5227 ARP announcement)
        "525400123456" "0a4d000a"  # sender MAC, sender IP 10.77.0.10
        "000000000000" "0a4d000a"  # target MAC zero, target IP == sender IP
    ) + bytes(18)  # padded to the 60-byte Ethernet minimum
    assert gratuitous_arp(MAC, "10.77.0.10") == expected
    assert len(expected) == 60


def test_unsolicited_na_exact_bytes() -> None:
    expected = bytes.fromhex(
        "333300000001"  # Ethernet dst: all-nodes multicast MAC
        "525400123456"  # Ethernet src
        "86dd"  # ethertype IPv6
        "60000000"  # version 6, traffic class 0, flow 0
        "0020" "3a" "ff"  # payload 32 bytes, next header ICMPv6, hop limit 255
        "fd770000000000000000000000000010"  # src: the advertised address
        "ff020000000000000000000000000001"  # dst: ff02::1
        "88" "00" "d4d3"  # type 136, code 0, checksum
        "20000000"  # flags: Override only (Router and Solicited clear)
        "fd770000000000000000000000000010"  # target address
        "02" "01" "525400123456"  # option 2 (target link-layer address), 1 x 8 bytes
    )
    assert unsolicited_na(MAC, "fd77::10") == expected


@pytest.mark.parametrize("ip6", ["fd77::10", "2001:db8::1", "fe80::5054:ff:fe12:3456", "fd77::ffff"])
def test_na_checksum_verifies_over_pseudo_header(ip6: str) -> None:
    frame = unsolicited_na(MAC, ip6)
    ip6_header, icmp = frame[14:54], frame[54:]
    payload_len = struct.unpack("!H", ip6_header[4:6])[0]
    assert payload_len == len(icmp) == 32
    src, dst = ip6_header[8:24], ip6_header[24:40]
    assert src == ipaddress.IPv6Address(ip6).packed
    assert dst == ipaddress.IPv6Address("ff02::1").packed
    pseudo = src + dst + payload_len.to_bytes(4, "big") + b"\0\0\0" + bytes([58])
    assert ones_complement_ok(pseudo + icmp)
    # and a corrupted message must fail the same check
    broken = bytearray(icmp)
    broken[10] ^= 0x01
    assert not ones_complement_ok(pseudo + bytes(broken))


def test_na_fields() -> None:
    frame = unsolicited_na("02:00:00:aa:bb:cc", "2001:db8::7")
    assert frame[0:6] == bytes.fromhex("333300000001")
    assert frame[6:12] == bytes.fromhex("020000aabbcc")
    assert frame[14] >> 4 == 6
    assert frame[20] == 58 and frame[21] == 255
    icmp = frame[54:]
    assert icmp[0] == 136 and icmp[1] == 0
    flags = icmp[4]
    assert flags & 0x20, "Override must be set"
    assert not flags & 0x40, "Solicited must be clear"
    assert not flags & 0x80, "Router must be clear"
    assert icmp[8:24] == ipaddress.IPv6Address("2001:db8::7").packed
    assert icmp[24:32] == b"\x02\x01" + bytes.fromhex("020000aabbcc")


def test_internet_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3 example words: 0001 f203 f4f5 f6f7 -> sum ddf2, checksum 220d
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    # odd length is padded with a zero byte
    assert internet_checksum(b"\x01") == internet_checksum(b"\x01\x00")


def test_announce_frames_one_per_address_prefix_allowed() -> None:
    frames = announce_frames(MAC, ["10.77.0.10/24", "fd77::10/64", "10.77.0.11"])
    assert frames == [
        gratuitous_arp(MAC, "10.77.0.10"),
        unsolicited_na(MAC, "fd77::10"),
        gratuitous_arp(MAC, "10.77.0.11"),
    ]


@pytest.mark.parametrize("mac", ["", "52:54:00:12:34", "52:54:00:12:34:5g", "525400123456"])
def test_bad_mac_rejected(mac: str) -> None:
    with pytest.raises(ValueError):
        mac_bytes(mac)


def test_bad_addresses_rejected() -> None:
    with pytest.raises(ValueError):
        gratuitous_arp(MAC, "fd77::1")
    with pytest.raises(ValueError):
        unsolicited_na(MAC, "10.0.0.1")
    with pytest.raises(ValueError):
        unsolicited_na(MAC, "ff02::1")
    assert mac_bytes("52-54-00-12-34-56") == mac_bytes(MAC)


# --- announce schedule and failure handling (no network needed) ---------------


def test_default_schedule_is_qemus() -> None:
    # QEMU announce: 5 rounds, first gap 50 ms, +100 ms per round
    assert AnnounceConfig().offsets_ms() == [0, 50, 200, 450, 800]
    assert AnnounceConfig(rounds=3, initial_ms=10, step_ms=0).offsets_ms() == [0, 10, 20]
    assert AnnounceConfig(rounds=0).offsets_ms() == []


def test_config_from_settings() -> None:
    class S:
        announce_rounds = 2
        announce_initial_ms = 7
        announce_step_ms = 3

    assert AnnounceConfig.from_settings(S()) == AnnounceConfig(2, 7, 3)


async def test_announce_reports_missing_interface_instead_of_raising() -> None:
    result = await announce("relocd-nosuch0", MAC, ["10.0.0.1"], AnnounceConfig(rounds=2, initial_ms=1))
    assert result.frames_sent == 0 and not result.ok
    # as root: no such interface; unprivileged: no CAP_NET_RAW -- either way one line, not an exception
    assert len(result.errors) == 1 and "relocd-nosuch0" in result.errors[0]
    assert "\n" not in result.errors[0]


async def test_announce_reports_missing_namespace_and_bad_input() -> None:
    result = await announce("eth0", MAC, ["10.0.0.1"], netns="relocd-no-such-netns")
    assert not result.ok and "relocd-no-such-netns" in result.errors[0]
    bad = await announce("eth0", "not-a-mac", ["10.0.0.1"])
    assert bad.frames_sent == 0 and "not a MAC" in bad.errors[0]
    off = await announce("eth0", MAC, ["10.0.0.1"], AnnounceConfig(rounds=0))
    assert off.ok and off.frames_sent == 0


def test_vif_names_fit_and_differ_per_daemon() -> None:
    netns_a, host_a, guest_a = vif_names("a-rather-long-domain-name", MAC, "hostA")
    netns_b, host_b, guest_b = vif_names("a-rather-long-domain-name", MAC, "hostB")
    assert len(host_a) <= 15 and len(guest_a) <= 15
    assert host_a.startswith("a-rather-l") and host_a != host_b
    assert netns_a == "hostA-a-rather-long-domain-name" and netns_a != netns_b
    assert guest_a == guest_b == "v525400123456"
    # the names a move gives a domain map to the same vif names
    assert vif_names("web--incoming", MAC, "h") == vif_names("web", MAC, "h")
    assert base_domain_name("web--migratedaway") == "web"
    assert ":" not in vif_names("a:b", MAC, "h")[1]
