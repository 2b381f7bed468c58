"""The announce in a real (namespaced) network: frames, timing, FDB move, ping gap.

A fake domain runs on hostA behind its vif while a client pings it every
10 ms; it is then "migrated": paused on A, built paused on B, resumed on B,
announced (or not) from B.  The switch is watched with a packet socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time
from dataclasses import dataclass

import pytest

from relocd.drivers.base import Vif
from relocd.net.announce import AnnounceResult
from relocd.net.vif import VifHandle, announce_vif, attach_vif, detach_vif, set_link
from tests.lab.netlab import Frame, NetLab

pytestmark = pytest.mark.system

DEFAULT_OFFSETS_MS = [0, 50, 200, 450, 800]
WINDOW_S = 1.0  # how long after the resume we watch the pings
DOWNTIME_S = 0.1  # stop-and-copy stand-in: the domain is paused on both hosts


@dataclass
class Move:
    mac: str
    resumed_at: float  # monotonic
    frames: list[Frame]
    result: AnnounceResult | None
    switch_port_before: str | None
    switch_port_after_first_burst: str | None
    switch_port_at_end: str | None
    recovery_ms: float | None  # first answered ping sent after the resume
    lost_in_window: int
    sent_in_window: int


async def wait_for_replies(lab: NetLab, ip: str, count: int = 5, timeout: float = 3.0) -> None:
    with lab.ping(ip, interval=0.02) as pinger:
        deadline = time.monotonic() + timeout
        while len(pinger.log.replied) < count:
            assert time.monotonic() < deadline, f"domain {ip} never answered on hostA"
            await asyncio.sleep(0.02)


async def migrate(lab: NetLab, name: str, vif: Vif, *, announce_on: bool) -> Move:
    """Run one move of ``name`` from hostA to hostB and measure it."""
    host_a, host_b = lab.hosts["hostA"], lab.hosts["hostB"]
    target_ip = next(a for a in vif.ips if ipaddress.ip_interface(a).version == 4).split("/")[0]
    on_a = attach_vif(name, vif, netns_prefix=host_a, host_netns=host_a)
    on_b: VifHandle | None = None
    try:
        await wait_for_replies(lab, target_ip)
        before = lab.fdb_port(lab.switch, vif.mac)
        with lab.ping(target_ip, interval=0.01) as pinger, lab.capture_switch() as capture:
            await asyncio.sleep(0.1)
            set_link(on_a, False)  # paused on A: must not answer
            on_b = attach_vif(name + "--incoming", vif, netns_prefix=host_b, up=False, host_netns=host_b)
            await asyncio.sleep(DOWNTIME_S)
            resumed_at = time.monotonic()
            set_link(on_b, True)
            result = None
            task = asyncio.create_task(announce_vif(on_b)) if announce_on else None
            await asyncio.sleep(0.03)  # the first burst leaves at once
            after_first = await asyncio.to_thread(lab.fdb_port, lab.switch, vif.mac)
            if task is not None:
                result = await task
            await asyncio.sleep(max(0.0, resumed_at + WINDOW_S - time.monotonic()))
            log = pinger.stop()
            frames = capture.stop()
        at_end = lab.fdb_port(lab.switch, vif.mac)
    finally:
        detach_vif(on_a)
        if on_b is not None:
            detach_vif(on_b)
    first = log.first_reply_after(resumed_at)
    window_end = resumed_at + WINDOW_S
    return Move(
        mac=vif.mac,
        resumed_at=resumed_at,
        frames=frames,
        result=result,
        switch_port_before=before,
        switch_port_after_first_burst=after_first,
        switch_port_at_end=at_end,
        recovery_ms=None if first is None else (first - resumed_at) * 1000,
        lost_in_window=log.lost_between(resumed_at, window_end),
        sent_in_window=sum(1 for t in log.sent.values() if resumed_at <= t < window_end),
    )


def from_domain(frames: list[Frame], mac: str, port: str = "swB") -> list[Frame]:
    """Frames the domain sent, as they entered the switch from ``port``."""
    return [f for f in frames if f.src_mac == mac and f.ifname == port and not f.outgoing]


def is_garp(frame: Frame) -> bool:
    """An ARP announcement (sender IP == target IP), not the domain resolving a peer."""
    return frame.ethertype == 0x0806 and frame.data[28:32] == frame.data[38:42]


def is_na(frame: Frame) -> bool:
    return frame.ethertype == 0x86DD and frame.data[20] == 58 and frame.data[54] == 136


async def test_announce_frames_and_schedule_on_the_switch(netlab: NetLab) -> None:
    vif = Vif(mac="52:54:00:77:00:01", ips=("10.77.0.11/24", "fd77::11/64"), bridge="br0")
    move = await migrate(netlab, "dual", vif, announce_on=True)

    assert move.result is not None and move.result.ok, move.result
    assert move.result.frames_sent == 10 and move.result.rounds == 5
    mine = from_domain(move.frames, vif.mac)
    garps = [f for f in mine if is_garp(f)]
    nas = [f for f in mine if is_na(f)]
    assert len(garps) == 5, f"expected 5 GARPs from hostB, saw {len(garps)}"
    assert len(nas) == 5, f"expected 5 NAs from hostB, saw {len(nas)}"

    mac = bytes.fromhex(vif.mac.replace(":", ""))
    ip4 = ipaddress.IPv4Address("10.77.0.11").packed
    for f in garps:
        d = f.data
        assert d[0:6] == b"\xff" * 6 and d[6:12] == mac
        htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", d[14:22])
        assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
        assert d[22:28] == mac and d[28:32] == ip4 and d[32:38] == bytes(6) and d[38:42] == ip4
    ip6 = ipaddress.IPv6Address("fd77::11").packed
    for f in nas:
        d = f.data
        assert d[0:6] == bytes.fromhex("333300000001") and d[6:12] == mac
        assert d[21] == 255 and d[22:38] == ip6
        assert d[38:54] == ipaddress.IPv6Address("ff02::1").packed
        assert d[58] & 0x20 and not d[58] & 0x40  # Override set, Solicited clear
        assert d[62:78] == ip6 and d[78:80] == b"\x02\x01" and d[80:86] == mac
    # the switch floods them to the other ports (teaching A's bridge too)
    flooded = {f.ifname for f in move.frames if f.src_mac == vif.mac and f.outgoing and is_garp(f)}
    assert flooded == {"swA", "swC"}

    offsets = [(f.ts - garps[0].ts) * 1000 for f in garps]
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    print(f"\nGARP offsets ms: {[round(o, 1) for o in offsets]}  gaps ms: {[round(g, 1) for g in gaps]}")
    for got, want in zip(offsets, DEFAULT_OFFSETS_MS):
        assert want - 5 <= got <= want + 120, f"burst at {got:.1f} ms, expected ~{want} ms"
    for f_garp, f_na in zip(garps, nas):
        assert abs(f_na.ts - f_garp.ts) < 0.02, "GARP and NA of one round leave together"

    assert move.switch_port_before == "swA"
    assert move.switch_port_after_first_burst == "swB"
    assert move.recovery_ms is not None and move.recovery_ms < 300


@pytest.mark.parametrize("announce_on", [True, False], ids=["announce", "no-announce"])
async def test_ping_gap_after_move(netlab: NetLab, announce_on: bool) -> None:
    # IPv4 only: the guest end then has IPv6 disabled and sends nothing by itself
    vif = Vif(mac="52:54:00:77:00:02", ips=("10.77.0.12/24",), bridge="br0")
    move = await migrate(netlab, "pingme", vif, announce_on=announce_on)
    mine = from_domain(move.frames, vif.mac)
    recovered = "never" if move.recovery_ms is None else f"{move.recovery_ms:.0f} ms"
    print(
        f"\n[{'announce' if announce_on else 'no announce'}] ping every 10 ms: first answer "
        f"{recovered} after resume; lost {move.lost_in_window}/{move.sent_in_window} "
        f"in the {WINDOW_S * 1000:.0f} ms window; switch FDB {move.switch_port_before} -> "
        f"{move.switch_port_after_first_burst} (30 ms after resume) -> {move.switch_port_at_end}; "
        f"frames from the domain at the switch: {len(mine)}"
    )
    assert move.switch_port_before == "swA"
    if announce_on:
        assert move.result is not None and move.result.ok
        assert len([f for f in mine if is_garp(f)]) == 5
        assert move.switch_port_after_first_burst == "swB"
        assert move.recovery_ms is not None and move.recovery_ms < 300
        assert move.lost_in_window < 30
    else:
        # the domain stayed silent, so nothing taught the switch: pings still go to A
        assert mine == [], "the domain's interface was not silent"
        assert move.switch_port_after_first_burst == "swA"
        assert move.recovery_ms is None, f"recovered in {move.recovery_ms:.0f} ms without an announce"
        assert move.lost_in_window == move.sent_in_window
