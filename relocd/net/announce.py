"""Tell the network where a domain lives now, right after it resumes.

QEMU's ``qemu_announce_self`` schedule: ``rounds`` bursts, the first at once,
then gaps of ``initial_ms``, ``initial_ms + step_ms``, ... (defaults 5, 50 ms,
+100 ms: bursts at 0, 50, 200, 450 and 800 ms).  Each burst sends one
gratuitous ARP per IPv4 address and one unsolicited NA per IPv6 address
(``frames.py``) through a raw AF_PACKET socket bound to one interface.

The frames must *enter* every bridge through the domain's own port, so they
are sent from the domain's side of its link: for the sim/kvm vif backend that
is the guest end of the veth, inside the domain's network namespace (pass
``netns``); see docs/network.md.

An announce never fails the migration: the domain already runs on this host
when it is called.  Errors (no such interface, no CAP_NET_RAW, a bad address)
come back in ``AnnounceResult.errors``; nothing but cancellation is raised.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from relocd.net.frames import announce_frames

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


class _AnnounceSettings(Protocol):
    announce_rounds: int
    announce_initial_ms: int
    announce_step_ms: int


@dataclass(frozen=True)
class AnnounceConfig:
    """When to send: ``rounds`` bursts; ``rounds=0`` turns the announce off."""

    rounds: int = 5
    initial_ms: int = 50
    step_ms: int = 100

    @classmethod
    def from_settings(cls, settings: _AnnounceSettings) -> AnnounceConfig:
        return cls(settings.announce_rounds, settings.announce_initial_ms, settings.announce_step_ms)

    def offsets_ms(self) -> list[int]:
        """Send time of each burst, relative to the first (0, 50, 200, 450, 800)."""
        offsets, t = [], 0
        for k in range(self.rounds):
            if k:
                t += self.initial_ms + (k - 1) * self.step_ms
            offsets.append(t)
        return offsets


@dataclass
class AnnounceResult:
    """What an announce did; ``errors`` empty means every frame went out."""

    frames_sent: int = 0
    rounds: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors


# --- network namespaces ------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    """A name made by ``ip netns add`` lives in /run/netns; a path is taken as is."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` with the calling thread in network namespace ``netns``.

    Sockets made there stay there.  It runs in a fresh thread, so neither the
    caller's thread nor a pool thread is ever left in a foreign namespace.
    """
    if netns is None:
        return fn()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            target = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)  # this thread only; it dies afterwards
            finally:
                os.close(target)
            outcome.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=body, name=f"netns:{netns}", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def open_packet_socket(ifname: str, netns: str | None = None, protocol: int = 0) -> socket.socket:
    """A raw AF_PACKET socket bound to ``ifname`` (in ``netns``); needs CAP_NET_RAW.

    ``protocol`` 0 sends only; pass ``ETH_P_ALL`` (3) to capture.
    """

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
        try:
            sock.bind((ifname, protocol))
        except BaseException:
            sock.close()
            raise
        return sock

    return call_in_netns(netns, make)


def describe_os_error(exc: OSError, ifname: str, netns: str | None) -> str:
    """One line an operator can act on."""
    where = f"{ifname} in netns {netns}" if netns else ifname
    if exc.errno in (errno.EPERM, errno.EACCES):
        return f"cannot announce on {where}: raw sockets need CAP_NET_RAW"
    if exc.errno in (errno.ENODEV, errno.ENXIO):
        return f"cannot announce on {where}: no such interface"
    if exc.errno == errno.ENOENT and netns:
        return f"cannot announce on {where}: no such network namespace"
    if exc.errno == errno.ENETDOWN:
        return f"cannot announce on {where}: interface is down"
    return f"cannot announce on {where}: {exc.strerror or exc}"


# --- the announce ------------------------------------------------------------


async def announce(
    ifname: str,
    mac: str,
    ips: Sequence[str],
    cfg: AnnounceConfig | None = None,
    *,
    netns: str | None = None,
) -> AnnounceResult:
    """Send ``cfg.rounds`` bursts of GARP/NA for ``mac``/``ips`` out of ``ifname``.

    Never raises (except CancelledError); see ``AnnounceResult.errors``.
    """
    cfg = cfg or AnnounceConfig()
    result = AnnounceResult()
    start = time.monotonic()
    try:
        await _announce(ifname, mac, ips, cfg, netns, result)
    except Exception as exc:  # never let an announce undo a resume
        result.errors.append(f"cannot announce on {ifname}: {exc}")
    finally:
        result.elapsed_ms = (time.monotonic() - start) * 1000
    return result


async def _announce(
    ifname: str,
    mac: str,
    ips: Sequence[str],
    cfg: AnnounceConfig,
    netns: str | None,
    result: AnnounceResult,
) -> None:
    if cfg.rounds <= 0 or not ips:
        return
    try:
        frames = announce_frames(mac, ips)
    except ValueError as exc:
        result.errors.append(f"cannot announce {mac}: {exc}")
        return
    try:
        sock = await asyncio.to_thread(open_packet_socket, ifname, netns)
    except OSError as exc:
        result.errors.append(describe_os_error(exc, ifname, netns))
        return
    try:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for offset_ms in cfg.offsets_ms():
            delay = t0 + offset_ms / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            _send_burst(sock, frames, result, ifname, netns)
            result.rounds += 1
    finally:
        sock.close()


def _send_burst(
    sock: socket.socket, frames: list[bytes], result: AnnounceResult, ifname: str, netns: str | None
) -> None:
    for frame in frames:
        try:
            sock.send(frame)
        except OSError as exc:
            message = describe_os_error(exc, ifname, netns)
            if message not in result.errors:
                result.errors.append(message)
        else:
            result.frames_sent += 1
