"""Record streams: the engine's only view of a peer (socket, file or test pipe).

The engine never touches sockets.  It talks to a ``RecordChannel``, which turns
records into bytes with the sans-IO codec, checks every record against the
conversation state machine, and moves page payload between guest memory and a
``ByteTransport`` without copying where it can:

* sending, the payload is a list of memoryview slices of guest memory (one per
  contiguous run of pages), handed to the transport as one gather write;
* receiving, contiguous runs are read straight into guest memory; scattered
  pages go through one reusable staging buffer and a numpy scatter, so a
  round of scattered dirty pages costs one read per batch, not one per page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from relocd.engine.faults import record_points
from relocd.engine.pages import page_buffers, scatter_pages, zero_pages
from relocd.errors import ProtocolError, Reason, RelocdError
from relocd.protocol.codec import (
    HEADER_SIZE,
    PAGES_FIXED_SIZE,
    PREAMBLE,
    check_preamble,
    decode_body,
    decode_pages,
    encode,
    encode_pages_header,
    pages_descriptor_size,
    parse_header,
)
from relocd.protocol.records import PagesHeader, Record, RecordType
from relocd.protocol.state import Conversation
from relocd.units import PAGE_SIZE

Pfns = npt.NDArray[np.uint64]

#: Runs at least this long are read straight into guest memory; shorter ones
#: are gathered through the staging buffer (fewer, larger reads).
DIRECT_RUN_PAGES = 16


class PeerGone(RelocdError):
    """The peer closed the connection or the file ended early."""

    reason = Reason.PROTOCOL


class ByteTransport(Protocol):
    """Moves bytes; implemented over sockets (server/), files and test pipes."""

    async def read_exactly(self, n: int) -> bytes:
        """Return exactly n bytes or raise PeerGone."""
        ...

    async def read_into(self, view: memoryview) -> None:
        """Fill view completely or raise PeerGone."""
        ...

    async def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Write all buffers in order (a gather write where possible)."""
        ...

    async def close(self) -> None: ...


class RecordChannel:
    """Records over a ByteTransport, checked against a Conversation."""

    def __init__(
        self,
        transport: ByteTransport,
        conversation: Conversation,
        *,
        max_frame: int,
        read_timeout: float | None = None,
        npages_limit: int | None = None,
        staging_pages: int = 2048,
    ) -> None:
        self.transport = transport
        self.conversation = conversation
        self.max_frame = max_frame
        self.read_timeout = read_timeout
        self.npages_limit = npages_limit
        self._staging_pages = staging_pages
        self._staging_buf: memoryview | None = None
        #: one record at a time on the wire: a transport's write may yield
        #: part-way (a full socket buffer), and a stream driver's chunks and
        #: its round reports come from two threads (engine/streamed.py)
        self._send_lock = asyncio.Lock()
        #: crash points (engine/faults.py): None unless a fault test watches them
        self._points = record_points(conversation)
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def _staging(self) -> memoryview:
        """The bounce buffer for scattered pages, allocated on first use only
        (a non-live stream or round 1 is all contiguous runs and never needs it)."""
        if self._staging_buf is None:
            self._staging_buf = memoryview(bytearray(self._staging_pages * PAGE_SIZE))
        return self._staging_buf

    # -- preamble -----------------------------------------------------------

    async def send_preamble(self) -> None:
        async with self._send_lock:
            await self.transport.write([PREAMBLE])
        self.bytes_sent += len(PREAMBLE)

    async def recv_preamble(self) -> None:
        buf = await self._read_exactly(len(PREAMBLE))
        check_preamble(buf)

    # -- sending -------------------------------------------------------------

    async def send(self, record: Record) -> None:
        async with self._send_lock:
            self.conversation.send(record)  # out of turn: refused before anything is encoded
            data = encode(record)
            if self._points is not None:
                self._points.sending(record.TYPE)
            await self.transport.write([data])
            if self._points is not None:
                self._points.sent()
        self.bytes_sent += len(data)

    async def send_pages(
        self, round_no: int, data_pfns: Pfns, zero_pfns: Pfns, memory: memoryview
    ) -> int:
        """Send one PAGES record with payload taken straight from guest memory."""
        header = encode_pages_header(round_no, data_pfns, zero_pfns)
        buffers: list[bytes | memoryview] = [header]
        buffers.extend(page_buffers(memory, data_pfns))
        async with self._send_lock:
            self.conversation.send(PagesHeader(round_no, data_pfns, zero_pfns))
            if self._points is not None:
                self._points.sending(RecordType.PAGES)
            await self.transport.write(buffers)
            if self._points is not None:
                self._points.sent()
        n = len(header) + len(data_pfns) * PAGE_SIZE
        self.bytes_sent += n
        return n

    # -- receiving -----------------------------------------------------------

    async def recv(self) -> object:
        """The next record; for PAGES a PagesHeader whose payload must be taken next."""
        raw = await self._read_exactly(HEADER_SIZE)
        header = parse_header(raw, self.max_frame)
        # Out of turn? Refuse on the header, before buffering any body.
        self.conversation.check_incoming_type(RecordType(header.type))
        record: object
        if header.type == RecordType.PAGES:
            fixed = await self._read_exactly(PAGES_FIXED_SIZE)
            size = pages_descriptor_size(header, fixed)
            rest = await self._read_exactly(size - PAGES_FIXED_SIZE)
            record = decode_pages(header, fixed + rest, self.npages_limit)
        else:
            body = await self._read_exactly(header.length)
            record = decode_body(header, body)
        self.conversation.receive(record)
        if self._points is not None:
            self._points.received(RecordType(header.type))
        return record

    async def recv_pages_into(self, header: PagesHeader, memory: memoryview) -> None:
        """Take a PAGES payload into guest memory (pfns already bounds-checked)."""
        pfns = header.data_pfns
        if len(pfns):
            await self._recv_payload(pfns, memory)
        if len(header.zero_pfns):
            zero_pages(memory, header.zero_pfns)

    async def skip_pages(self, header: PagesHeader) -> None:
        """Read and discard a PAGES payload (inspecting a savefile)."""
        left = len(header.data_pfns) * PAGE_SIZE
        while left:
            n = min(left, len(self._staging))
            await self._read_into(self._staging[:n])
            left -= n

    async def _recv_payload(self, pfns: Pfns, memory: memoryview) -> None:
        # Walk the payload in order: long contiguous runs go straight into guest
        # memory; consecutive short runs are gathered in the staging buffer and
        # scattered with numpy in one go.
        breaks = np.flatnonzero(np.diff(pfns.astype(np.int64)) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(pfns)]))
        staged_from = -1  # index into pfns of the first staged page, -1 = none
        staging_cap = len(self._staging) // PAGE_SIZE
        for s, e in zip(starts.tolist(), ends.tolist()):
            count = e - s
            if count >= DIRECT_RUN_PAGES:
                if staged_from >= 0:
                    await self._flush_staged(pfns[staged_from:s], memory)
                    staged_from = -1
                first = int(pfns[s])
                await self._read_into(memory[first * PAGE_SIZE : (first + count) * PAGE_SIZE])
                continue
            if staged_from < 0:
                staged_from = s
            elif e - staged_from > staging_cap:
                await self._flush_staged(pfns[staged_from:s], memory)
                staged_from = s
        if staged_from >= 0:
            await self._flush_staged(pfns[staged_from:], memory)

    async def _flush_staged(self, pfns: Pfns, memory: memoryview) -> None:
        n = len(pfns)
        cap = len(self._staging) // PAGE_SIZE
        for off in range(0, n, cap):
            chunk = pfns[off : off + cap]
            view = self._staging[: len(chunk) * PAGE_SIZE]
            await self._read_into(view)
            scatter_pages(memory, chunk, view)

    async def _read_exactly(self, n: int) -> bytes:
        if self.read_timeout is None:
            data = await self.transport.read_exactly(n)
        else:
            try:
                async with asyncio.timeout(self.read_timeout):
                    data = await self.transport.read_exactly(n)
            except TimeoutError:
                raise ProtocolError(
                    f"peer sent nothing for {self.read_timeout:g} s", reason=Reason.TIMEOUT
                ) from None
        self.bytes_received += n
        return data

    async def _read_into(self, view: memoryview) -> None:
        if self.read_timeout is None:
            await self.transport.read_into(view)
        else:
            try:
                async with asyncio.timeout(self.read_timeout):
                    await self.transport.read_into(view)
            except TimeoutError:
                raise ProtocolError(
                    f"peer sent nothing for {self.read_timeout:g} s", reason=Reason.TIMEOUT
                ) from None
        self.bytes_received += len(view)

    async def close(self) -> None:
        await self.transport.close()


class MemoryTransport:
    """One end of an in-memory byte pipe (tests): see ``memory_pipe``."""

    def __init__(self, incoming: asyncio.Queue[bytes | None], outgoing: asyncio.Queue[bytes | None]):
        self._in = incoming
        self._out = outgoing
        self._buf = bytearray()
        self._eof = False

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            if self._eof:
                raise PeerGone("peer closed the stream")
            chunk = await self._in.get()
            if chunk is None:
                self._eof = True
            else:
                self._buf += chunk

    async def read_exactly(self, n: int) -> bytes:
        await self._fill(n)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def read_into(self, view: memoryview) -> None:
        n = len(view)
        await self._fill(n)
        view[:] = self._buf[:n]
        del self._buf[:n]

    async def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        if self._out is None:
            raise PeerGone("stream closed")
        await self._out.put(b"".join(bytes(b) for b in buffers))

    async def close(self) -> None:
        await self._out.put(None)


def memory_pipe() -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected in-memory transports."""
    a: asyncio.Queue[bytes | None] = asyncio.Queue()
    b: asyncio.Queue[bytes | None] = asyncio.Queue()
    return MemoryTransport(a, b), MemoryTransport(b, a)
