"""The start of every connection: preamble and HELLO, and who we say we are.

Both ends send the preamble and one HELLO (versions, features, role,
migration id, node name); the features both sides set decide what the
conversation may use (zero pages, the digest algorithm, recovery queries).
"""

from __future__ import annotations

import socket
import uuid as uuidlib

from relocd.engine.stream import RecordChannel
from relocd.protocol.records import (
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    DigestAlgo,
    Feature,
    Hello,
    Role,
)

FEATURES = Feature.ZERO_PAGES | Feature.DIGEST_SHA256 | Feature.QUERY | Feature.DIGEST_BLAKE3 | Feature.CHANNELS


def digest_algo_for(peer_features: int) -> DigestAlgo:
    """BLAKE3 when the peer hashes it too (5x faster: --verify hashes while paused)."""
    return DigestAlgo.BLAKE3 if peer_features & FEATURES & Feature.DIGEST_BLAKE3 else DigestAlgo.SHA256


def host_id() -> str | None:
    """This machine's boot id: two daemons that share a hypervisor share it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:64] or None
    except OSError:
        return None


def node_name() -> str:
    """This host's name for HELLO: at most 255 bytes of UTF-8, cut on a character boundary."""
    return socket.gethostname().encode()[:255].decode("utf-8", errors="ignore")


async def hello(channel: RecordChannel, role: Role, migration_id: str) -> Hello:
    """Exchange preamble and HELLO as the connecting side; returns the peer's HELLO."""
    await channel.send_preamble()
    await channel.send(
        Hello(PROTOCOL_MAJOR, PROTOCOL_MINOR, FEATURES, role, uuidlib.UUID(migration_id).bytes, node_name())
    )
    await channel.recv_preamble()
    peer = await channel.recv()
    assert isinstance(peer, Hello)
    return peer


async def answer_hello(channel: RecordChannel) -> Hello:
    """Read the initiator's preamble and HELLO, answer with ours."""
    await channel.recv_preamble()
    peer = await channel.recv()
    assert isinstance(peer, Hello)
    await channel.send_preamble()
    await channel.send(Hello(PROTOCOL_MAJOR, PROTOCOL_MINOR, FEATURES, Role.TARGET, bytes(16), node_name()))
    return peer
