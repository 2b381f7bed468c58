"""The records of extra page channels: JOIN, JOINED and CHANNEL_END (protocol 1.1).

A migration may stripe its pages over several connections (feature
CHANNELS).  The main connection is channel 0 and carries every control
record; each extra channel is its own connection that says HELLO with role
CHANNEL and the migration's id, JOINs with the token the target handed out
in RESERVED, and then carries only PAGES, ended by CHANNEL_END.  The
byte layout is in docs/protocol.md, "Parallel channels".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Self

from relocd.protocol.codes import RecordType
from relocd.protocol.fields import check_uint, expect_size, local_error, remote_error
from relocd.protocol.recordbase import Record, register

#: bytes of the secret a JOIN must present (handed out in RESERVED)
CHANNEL_TOKEN_SIZE = 16
#: most channels a migration may use, the main connection included
MAX_CHANNELS = 16

_JOIN = struct.Struct("!16sHH")  # token index count
_CHANNEL_END = struct.Struct("!Q")  # pages


@register
@dataclass(frozen=True, slots=True)
class Join(Record):
    """An extra channel asks to join migration (its HELLO's id) as channel ``index`` of ``count``."""

    TYPE = RecordType.JOIN
    MIN_BODY = MAX_BODY = _JOIN.size

    token: bytes
    index: int
    count: int

    def serialize_body(self) -> bytes:
        if not isinstance(self.token, bytes | bytearray) or len(self.token) != CHANNEL_TOKEN_SIZE:
            raise local_error("JOIN", f"token must be {CHANNEL_TOKEN_SIZE} bytes")
        index = check_uint("JOIN index", self.index, 16)
        count = check_uint("JOIN count", self.count, 16)
        if not 1 <= index < count <= MAX_CHANNELS:
            raise local_error("JOIN", f"channel {index} of {count}: need 1 <= index < count <= {MAX_CHANNELS}")
        return _JOIN.pack(bytes(self.token), index, count)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_size("JOIN", body, _JOIN.size)
        token, index, count = _JOIN.unpack_from(body)
        if not 1 <= index < count <= MAX_CHANNELS:
            raise remote_error("JOIN", f"channel {index} of {count}: need 1 <= index < count <= {MAX_CHANNELS}")
        return cls(token, index, count)


@register
@dataclass(frozen=True, slots=True)
class Joined(Record):
    """The target took the channel: PAGES may follow on it."""

    TYPE = RecordType.JOINED
    MIN_BODY = MAX_BODY = 0

    def serialize_body(self) -> bytes:
        return b""

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_size("JOINED", body, 0)
        return cls()


@register
@dataclass(frozen=True, slots=True)
class ChannelEnd(Record):
    """The last record of an extra channel: ``pages`` it carried in all (data and zero)."""

    TYPE = RecordType.CHANNEL_END
    MIN_BODY = MAX_BODY = _CHANNEL_END.size

    pages: int

    def serialize_body(self) -> bytes:
        return _CHANNEL_END.pack(check_uint("CHANNEL_END pages", self.pages, 64))

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_size("CHANNEL_END", body, _CHANNEL_END.size)
        return cls(_CHANNEL_END.unpack_from(body)[0])
