"""RecordChannel: records from concurrent senders never interleave on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from relocd.engine.stream import RecordChannel, memory_pipe
from relocd.protocol.records import EndRound, Role, StreamChunk
from relocd.protocol.state import Conversation


class TricklingWriter:
    """A transport whose write yields between pieces, as a socket with a full buffer does."""

    def __init__(self) -> None:
        self.wire = bytearray()

    async def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        for buf in buffers:
            data = bytes(buf)
            for i in range(0, len(data), 7):
                self.wire += data[i : i + 7]
                await asyncio.sleep(0)

    async def read_exactly(self, n: int) -> bytes:
        raise NotImplementedError

    async def read_into(self, view: memoryview) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


async def test_concurrent_senders_do_not_interleave_records() -> None:
    """A stream driver's chunks and its round reports are sent from two threads' coroutines at once."""
    writer = TricklingWriter()
    conv = Conversation(Role.SOURCE)
    ch = RecordChannel(writer, conv, max_frame=1 << 20)
    ch.conversation.send = lambda record: None  # type: ignore[method-assign]  # the wire is what is checked here
    chunks = [StreamChunk(bytes([i]) * 100) for i in range(20)]
    rounds = [EndRound(i + 1, 10, 5) for i in range(20)]
    await asyncio.gather(*(ch.send(c) for c in chunks), *(ch.send(r) for r in rounds))

    src_t, dst_t = memory_pipe()
    reader = RecordChannel(dst_t, Conversation(Role.TARGET), max_frame=1 << 20)
    reader.conversation.check_incoming_type = lambda t: None  # type: ignore[method-assign]
    reader.conversation.receive = lambda record: None  # type: ignore[method-assign]
    await src_t.write([bytes(writer.wire)])
    got = [await reader.recv() for _ in range(40)]  # a CRC mismatch here means interleaved frames
    assert sorted((type(r).__name__, str(r)) for r in got) == sorted((type(r).__name__, str(r)) for r in chunks + rounds)
