"""A TCP proxy between two relocd daemons that cuts, corrupts or stalls one stream.

The source daemon is pointed at the proxy instead of the target.  The proxy
reads each direction record by record (headers parsed with
``relocd.protocol.codec``) and, on the first record that matches the fault's
trigger, does one of:

* ``cut``     -- close both sides before a byte of that record is forwarded;
* ``corrupt`` -- flip one byte the record's CRC covers (the last byte of a
  control record's body, of a PAGES descriptor, or the CRC itself for an empty
  body), forward it, and go on forwarding everything else untouched;
* ``stall``   -- stop reading and forwarding in both directions but keep both
  connections open, as a network that silently drops everything would.

Only the first connection (the migration) is faulted: later connections
(the source's recovery QUERY) pass through untouched, so the daemons can
recover the way they would once a real network heals.

Without a fault, ``raw=True`` forwards bytes as they come without parsing
them (a TLS link), and ``cut_now()`` cuts every open link at a moment the
caller picks (a daemon's crash point, ``crashpoints.py``); links opened
afterwards pass, as once the network heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import struct

from relocd.protocol.codec import HEADER_SIZE, PAGES_FIXED_SIZE, PREAMBLE
from relocd.protocol.records import RecordType

_HEADER = struct.Struct("!BBHII")
_PAGES_FIXED = struct.Struct("!IIII")
#: Largest chunk read from either side at a time.
CHUNK = 1 << 20


class Action(str, enum.Enum):
    CUT = "cut"
    CORRUPT = "corrupt"
    STALL = "stall"


class Direction(str, enum.Enum):
    TO_TARGET = "to-target"  # what the source sends
    TO_SOURCE = "to-source"  # what the target answers


@dataclasses.dataclass(frozen=True)
class Trigger:
    """The first record of ``record_type`` going ``direction`` (PAGES: of round >= ``min_round``)."""

    direction: Direction
    record_type: RecordType
    min_round: int = 0

    def matches(self, direction: Direction, rtype: int, round_no: int | None) -> bool:
        if direction != self.direction or rtype != self.record_type:
            return False
        return round_no is None or round_no >= self.min_round


#: Where each migration phase is caught on the wire (see docs/faults.md).
PHASE_TRIGGERS: dict[str, Trigger] = {
    "hello": Trigger(Direction.TO_TARGET, RecordType.HELLO),
    "reserve": Trigger(Direction.TO_TARGET, RecordType.RESERVE),
    "config": Trigger(Direction.TO_TARGET, RecordType.CONFIG),
    "precopy-1": Trigger(Direction.TO_TARGET, RecordType.PAGES, min_round=1),
    "precopy-2": Trigger(Direction.TO_TARGET, RecordType.PAGES, min_round=2),
    "stop-and-copy": Trigger(Direction.TO_TARGET, RecordType.STOP),
    "prepared": Trigger(Direction.TO_SOURCE, RecordType.PREPARED),
    "go": Trigger(Direction.TO_TARGET, RecordType.GO),
    "resumed": Trigger(Direction.TO_SOURCE, RecordType.RESUMED),
}


@dataclasses.dataclass(frozen=True)
class Fault:
    trigger: Trigger
    action: Action


@dataclasses.dataclass
class Fired:
    """What the proxy did, for the test's report."""

    action: Action
    record: str
    round: int | None
    records_before: int


class _Link:
    """One proxied connection: two pumps that share the fault and the stall flag."""

    def __init__(self, proxy: FaultProxy, fault: Fault | None) -> None:
        self.proxy = proxy
        self.fault = fault
        self.stalled = asyncio.Event()
        self.cut = False
        self.writers: list[asyncio.StreamWriter] = []
        self.counts = {Direction.TO_TARGET: 0, Direction.TO_SOURCE: 0}

    def fire(self, action: Action, rtype: int, round_no: int | None, direction: Direction) -> None:
        self.fault = None  # once per link
        self.proxy.fired = Fired(action, RecordType(rtype).name, round_no, self.counts[direction])
        self.proxy.fired_event.set()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
        buf = bytearray()
        preamble_left = len(PREAMBLE)
        passthrough = 0  # body bytes of the current record still to forward untouched
        try:
            while not self.cut:
                if self.stalled.is_set():
                    await asyncio.Event().wait()  # hold the connection, read nothing
                chunk = await reader.read(CHUNK)
                if not chunk:
                    break
                if self.stalled.is_set():
                    await asyncio.Event().wait()
                if self.proxy.raw:
                    writer.write(chunk)
                    await writer.drain()
                    continue
                buf += chunk
                out = bytearray()
                while buf:
                    if preamble_left:
                        n = min(preamble_left, len(buf))
                        out += buf[:n]
                        del buf[:n]
                        preamble_left -= n
                        continue
                    if passthrough:
                        n = min(passthrough, len(buf))
                        out += buf[:n]
                        del buf[:n]
                        passthrough -= n
                        continue
                    if len(buf) < HEADER_SIZE:
                        break
                    rtype, _flags, _res, length, _crc = _HEADER.unpack_from(buf)
                    round_no: int | None = None
                    covered = length
                    if rtype == RecordType.PAGES:
                        if len(buf) < HEADER_SIZE + PAGES_FIXED_SIZE:
                            break
                        round_no, n_data, n_zero, _ = _PAGES_FIXED.unpack_from(buf, HEADER_SIZE)
                        covered = PAGES_FIXED_SIZE + 8 * (n_data + n_zero)
                    fault = self.fault
                    if fault is not None and fault.trigger.matches(direction, rtype, round_no):
                        if fault.action == Action.CORRUPT and len(buf) < HEADER_SIZE + covered:
                            break  # wait for everything the CRC covers
                        self.fire(fault.action, rtype, round_no, direction)
                        if fault.action == Action.CUT:
                            if out:
                                writer.write(bytes(out))
                            await self._cut()
                            return
                        if fault.action == Action.STALL:
                            if out:
                                writer.write(bytes(out))
                            self.stalled.set()
                            await asyncio.Event().wait()
                        at = HEADER_SIZE + covered - 1 if covered else 8  # body's last byte, or the CRC
                        buf[at] ^= 0x5A
                    self.counts[direction] += 1
                    take = min(len(buf), HEADER_SIZE + length)
                    out += buf[:take]
                    del buf[:take]
                    passthrough = HEADER_SIZE + length - take
                if out:
                    writer.write(bytes(out))
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not self.stalled.is_set():
                await self._cut()

    async def _cut(self) -> None:
        self.cut = True
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.close()


class FaultProxy:
    """Listens on ``listen_host`` (a free port), forwards to ``upstream``; faults the first link."""

    def __init__(
        self, listen_host: str, upstream: tuple[str, int], fault: Fault | None, *, raw: bool = False
    ) -> None:
        assert not (raw and fault), "a raw proxy does not parse records, so it has no trigger"
        self.raw = raw
        self.listen_host = listen_host
        self.upstream = upstream
        self.fault = fault
        self.port = 0
        self.connections = 0
        self.fired: Fired | None = None
        self.fired_event = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        fault = self.fault if self.connections == 0 else None
        self.connections += 1
        link = _Link(self, fault)
        link.writers = [c_writer]
        self._links.append(link)  # open from now on: cut_now() cuts it even while it dials upstream
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            return
        link.writers.append(u_writer)
        if link.cut:
            u_writer.close()
            return
        pumps = [
            asyncio.ensure_future(link.pump(c_reader, u_writer, Direction.TO_TARGET)),
            asyncio.ensure_future(link.pump(u_reader, c_writer, Direction.TO_SOURCE)),
        ]
        for t in pumps:
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        await asyncio.gather(*pumps, return_exceptions=True)

    async def cut_now(self, settle: float = 0.05) -> int:
        """Cut every open link (both sides closed); returns how many were open.

        First ``settle`` seconds for connections the kernel has accepted but
        the event loop has not yet (a source stopped just after its first
        write): they are open links too.  Nothing new dials in meanwhile: the
        point's daemon is held, and the other one has no reason to reconnect
        while its link still stands.
        """
        await asyncio.sleep(settle)
        links = [link for link in self._links if not link.cut]
        for link in links:
            await link._cut()
        return len(links)

    async def close(self) -> None:
        """Drop every link (stalled ones too) and stop listening."""
        if self._server is not None:
            self._server.close()
        for link in self._links:
            await link._cut()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
