"""The numbers on the wire: protocol version, record types, roles, features, states.

Kept apart from the record classes so the state machine and the docs checks
can name them without pulling in the codecs.
"""

from __future__ import annotations

import enum
from typing import Final

PROTOCOL_MAJOR: Final = 1
PROTOCOL_MINOR: Final = 1


class RecordType(enum.IntEnum):
    """The type byte of every record (header offset 0)."""

    HELLO = 0x01
    RESERVE = 0x02
    RESERVED = 0x03
    REFUSE = 0x04
    CONFIG = 0x05
    JOIN = 0x06
    JOINED = 0x07
    PAGES = 0x10
    END_ROUND = 0x11
    STOP = 0x12
    VCPU_STATE = 0x13
    DIGEST = 0x14
    COMMIT = 0x15
    STREAM = 0x16
    CHANNEL_END = 0x17
    PREPARED = 0x20
    GO = 0x21
    RESUMED = 0x22
    DONE = 0x23
    ABORT = 0x30
    QUERY = 0x31
    OUTCOME = 0x32


class Role(enum.IntEnum):
    """What the sender of a HELLO is in this conversation."""

    SOURCE = 1  # wants to send a domain
    TARGET = 2  # the accepting side
    QUERY = 3  # asks about a migration's outcome (recovery after GO)
    CHANNEL = 4  # an extra page channel of a migration in flight (JOIN)


class Feature(enum.IntFlag):
    """HELLO feature bits; a feature is used only when both sides set it."""

    ZERO_PAGES = 1 << 0
    DIGEST_SHA256 = 1 << 1
    QUERY = 1 << 2
    DIGEST_BLAKE3 = 1 << 3
    CHANNELS = 1 << 4


KNOWN_FEATURES: Final = (
    Feature.ZERO_PAGES | Feature.DIGEST_SHA256 | Feature.QUERY | Feature.DIGEST_BLAKE3 | Feature.CHANNELS
)


class OutcomeState(enum.IntEnum):
    """What the target knows about a migration (OUTCOME record)."""

    UNKNOWN = 0
    RECEIVING = 1
    PREPARED = 2
    RESUMED = 3
    ABORTED = 4
    GO_SENT = 5
    DONE = 6


class DigestAlgo(enum.IntEnum):
    SHA256 = 1
    BLAKE3 = 2  # 256-bit output; ~5x SHA-256's speed on one core


DIGEST_SIZES: Final = {DigestAlgo.SHA256: 32, DigestAlgo.BLAKE3: 32}
