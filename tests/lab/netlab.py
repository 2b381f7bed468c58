"""A two-host network lab in network namespaces, for the announce tests and demos.

::

    client --eth0~~swC--+
                        |  switch: br0 (a learning bridge)
    hostA: br0 -uplink~~swA--+
    hostB: br0 -uplink~~swB--+

Four namespaces (``rl-<tag>-hostA``, ``-hostB``, ``-switch``, ``-client``)
joined by veth pairs; the domains' vifs plug into hostA's or hostB's br0.
Addresses exist only inside the lab (client 10.77.0.100/24, fd77::100/64);
the machine's own interfaces are never touched.  Every name carries a per-run
random tag, and teardown (context manager, atexit) deletes the namespaces,
which takes every veth and bridge with them.

CLI for demos: ``python tests/lab/netlab.py up|down|status [--tag TAG]``.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

if __package__ in (None, ""):  # run as a script: make `relocd` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from relocd.net.announce import call_in_netns, open_packet_socket  # noqa: E402

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35  # socket.h; also the SCM_ type of its control message
PACKET_OUTGOING = 4

CLIENT_IP4 = "10.77.0.100"
CLIENT_IP6 = "fd77::100"
LAB_PREFIX4 = 24
LAB_PREFIX6 = 64
HOSTS = ("hostA", "hostB")


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip [-n NETNS] ARGS``; raises with ip's own message on failure."""
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def write_sysctl(netns: str, key: str, value: str) -> None:
    """Set a sysctl inside ``netns`` (net.* sysctls are per namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    call_in_netns(netns, write)


@dataclass(frozen=True)
class Frame:
    """One captured frame: kernel receive time (CLOCK_REALTIME, s), port, direction."""

    ts: float
    ifname: str
    outgoing: bool
    data: bytes

    @property
    def src_mac(self) -> str:
        return self.data[6:12].hex(":")

    @property
    def ethertype(self) -> int:
        return int(struct.unpack("!H", self.data[12:14])[0])


class Capture:
    """Frames seen on some interfaces of one namespace, read by a background thread."""

    def __init__(self, netns: str, ifnames: Sequence[str]) -> None:
        self.frames: list[Frame] = []
        self._stop = threading.Event()
        self._socks = [open_packet_socket(name, netns, ETH_P_ALL) for name in ifnames]
        for sock in self._socks:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"capture:{netns}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cmsg_space = socket.CMSG_SPACE(16)
        while not self._stop.is_set():
            ready, _, _ = select.select(self._socks, [], [], 0.05)
            for sock in ready:
                try:
                    data, ancdata, _, addr = sock.recvmsg(65535, cmsg_space)
                except BlockingIOError:
                    continue
                ts = time.time()
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", payload[:16])
                        ts = sec + nsec / 1e9
                self.frames.append(Frame(ts, addr[0], addr[2] == PACKET_OUTGOING, data))

    def stop(self) -> list[Frame]:
        self._stop.set()
        self._thread.join()
        for sock in self._socks:
            sock.close()
        return self.frames

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.stop()


@dataclass
class PingLog:
    """Echo requests sent every ``interval`` s and which of them came back."""

    sent: dict[int, float] = field(default_factory=dict)  # seq -> monotonic send time
    replied: dict[int, float] = field(default_factory=dict)  # seq -> monotonic reply time

    def first_reply_after(self, t: float) -> float | None:
        """Monotonic send time of the first request sent at/after ``t`` that got a reply."""
        times = [self.sent[s] for s in self.replied if self.sent[s] >= t]
        return min(times) if times else None

    def lost_between(self, t0: float, t1: float) -> int:
        return sum(1 for s, ts in self.sent.items() if t0 <= ts < t1 and s not in self.replied)


class Pinger:
    """ICMP echo every ``interval`` s from a namespace, in a thread (no ping binary needed)."""

    def __init__(self, netns: str, target: str, interval: float = 0.01) -> None:
        self.log = PingLog()
        self._target = target
        self._interval = interval
        self._stop = threading.Event()
        self._ident = secrets.randbits(16)
        self._sock = call_in_netns(
            netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        )
        self._sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"ping:{target}", daemon=True)
        self._thread.start()

    @staticmethod
    def _checksum(data: bytes) -> int:
        total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    def _echo(self, seq: int) -> bytes:
        body = struct.pack("!BBHHH", 8, 0, 0, self._ident, seq) + b"relocd-lab-ping!"
        return body[:2] + struct.pack("!H", self._checksum(body)) + body[4:]

    def _run(self) -> None:
        seq, next_send = 0, time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                seq = (seq + 1) & 0xFFFF
                self.log.sent[seq] = now
                try:
                    self._sock.sendto(self._echo(seq), (self._target, 0))
                except OSError:
                    pass  # e.g. no route yet: counts as lost
                next_send += self._interval
            ready, _, _ = select.select([self._sock], [], [], max(0.0, next_send - time.monotonic()))
            while ready:
                try:
                    packet = self._sock.recv(2048)
                except BlockingIOError:
                    break
                header_len = (packet[0] & 0x0F) * 4
                kind, _, _, ident, rseq = struct.unpack("!BBHHH", packet[header_len : header_len + 8])
                if kind == 0 and ident == self._ident and rseq in self.log.sent:
                    self.log.replied.setdefault(rseq, time.monotonic())

    def stop(self) -> PingLog:
        self._stop.set()
        self._thread.join()
        self._sock.close()
        return self.log

    def __enter__(self) -> Pinger:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.stop()


class NetLab:
    """The lab; ``with NetLab() as lab:`` builds it and always tears it down."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.prefix = f"rl-{self.tag}"
        self.switch = f"{self.prefix}-switch"
        self.client = f"{self.prefix}-client"
        self.hosts = {h: f"{self.prefix}-{h}" for h in HOSTS}
        # switch port facing each host / the client
        self.switch_port = {"hostA": "swA", "hostB": "swB", "client": "swC"}

    @property
    def namespaces(self) -> list[str]:
        return [self.switch, self.client, *self.hosts.values()]

    # --- life cycle ----------------------------------------------------------

    def up(self) -> NetLab:
        atexit.register(self.down)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        for ns in self.namespaces:
            ip("netns", "add", ns)
            ip("link", "set", "lo", "up", netns=ns)
            write_sysctl(ns, "net.ipv6.conf.default.addr_gen_mode", "1")  # quiet infrastructure
        self._bridge(self.switch)
        for host, ns in self.hosts.items():
            self._bridge(ns)
            port = self.switch_port[host]
            ip("link", "add", "uplink", "type", "veth", "peer", "name", port, "netns", self.switch, netns=ns)
            ip("link", "set", "uplink", "master", "br0", "up", netns=ns)
            ip("link", "set", port, "master", "br0", "up", netns=self.switch)
        port = self.switch_port["client"]
        ip("link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch, netns=self.client)
        ip("link", "set", port, "master", "br0", "up", netns=self.switch)
        ip("link", "set", "eth0", "up", netns=self.client)
        ip("addr", "add", f"{CLIENT_IP4}/{LAB_PREFIX4}", "dev", "eth0", netns=self.client)
        ip("addr", "add", f"{CLIENT_IP6}/{LAB_PREFIX6}", "dev", "eth0", "nodad", netns=self.client)
        # keep the client's ARP entries REACHABLE for the whole measurement
        write_sysctl(self.client, "net.ipv4.neigh.eth0.base_reachable_time_ms", "120000")

    @staticmethod
    def _bridge(ns: str) -> None:
        ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "mcast_snooping", "0",
           "forward_delay", "0", netns=ns)
        ip("link", "set", "br0", "up", netns=ns)

    def down(self) -> None:
        """Delete every namespace of this lab; safe to call twice or after a failed build."""
        for ns in self.namespaces + self.leftover_namespaces():
            ip("netns", "del", ns, check=False)
        atexit.unregister(self.down)

    def leftover_namespaces(self) -> list[str]:
        """Namespaces carrying this lab's prefix (e.g. vif namespaces of lab daemons)."""
        out = ip("netns", "list", check=False).stdout
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(self.prefix + "-") and n not in self.namespaces]

    def __enter__(self) -> NetLab:
        return self.up()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    # --- helpers for tests ---------------------------------------------------

    def run(self, netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside a namespace of the lab."""
        proc = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} in {netns}: {proc.stderr.strip()}")
        return proc

    def fdb(self, netns: str, bridge: str = "br0") -> list[dict[str, object]]:
        """``bridge fdb show br BRIDGE`` inside ``netns``, as JSON records."""
        out = self.run(netns, "bridge", "-j", "fdb", "show", "br", bridge).stdout
        return list(json.loads(out or "[]"))

    def fdb_port(self, netns: str, mac: str, bridge: str = "br0") -> str | None:
        """The port a bridge forwards ``mac`` to (learned entries only), or None."""
        for entry in self.fdb(netns, bridge):
            if str(entry.get("mac", "")).lower() == mac.lower() and "permanent" not in str(
                entry.get("state", "")
            ):
                return str(entry.get("ifname"))
        return None

    def capture_switch(self, ports: Sequence[str] | None = None) -> Capture:
        """Capture on the switch's ports (default: all three)."""
        return Capture(self.switch, ports or list(self.switch_port.values()))

    def ping(self, target: str, interval: float = 0.01) -> Pinger:
        return Pinger(self.client, target, interval)

    def status(self) -> str:
        lines = []
        for ns in self.namespaces + self.leftover_namespaces():
            links = ip("-br", "link", "show", netns=ns, check=False)
            if links.returncode:
                lines.append(f"{ns}: absent")
                continue
            lines.append(f"{ns}:")
            lines += ["  " + line for line in links.stdout.splitlines()]
        for ns in (self.switch, *self.hosts.values()):
            proc = self.run(ns, "bridge", "fdb", "show", "br", "br0", "dynamic", check=False)
            if proc.returncode == 0:
                lines.append(f"{ns} br0 learned MACs:")
                lines += ["  " + line for line in proc.stdout.splitlines()]
        return "\n".join(lines)


def iter_lab_namespaces() -> Iterator[str]:
    out = ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        if line.startswith("rl-"):
            yield line.split()[0]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="relocd network-namespace lab")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--tag", default="demo", help="lab name tag (namespaces rl-TAG-*)")
    args = parser.parse_args(argv)
    lab = NetLab(args.tag)
    if args.action == "up":
        lab.up()
        atexit.unregister(lab.down)  # the demo keeps it until `down`
        print(f"lab {args.tag} up: namespaces {' '.join(lab.namespaces)}")
        print(f"vif netns prefixes for the two daemons: {lab.hosts['hostA']} {lab.hosts['hostB']}")
        print(f"client: {CLIENT_IP4}/{LAB_PREFIX4} {CLIENT_IP6}/{LAB_PREFIX6} in {lab.client}")
    elif args.action == "down":
        lab.down()
        print(f"lab {args.tag} down")
    else:
        print(lab.status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
