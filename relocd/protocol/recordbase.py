"""The base of every wire record and the registry that maps type bytes to classes."""

from __future__ import annotations

from typing import ClassVar, Final, Self, TypeVar

from relocd.protocol.codes import RecordType


class Record:
    """Base of every wire record.

    ``MIN_BODY``/``MAX_BODY`` bound the body length; the codec checks them on
    the header, before the body is read.  ``MAX_BODY = None`` means "bounded
    only by the connection's frame limit" (PAGES).
    """

    __slots__ = ()

    TYPE: ClassVar[RecordType]
    MIN_BODY: ClassVar[int] = 0
    MAX_BODY: ClassVar[int | None] = 0

    def serialize_body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        raise NotImplementedError


RECORD_CLASSES: Final[dict[RecordType, type[Record]]] = {}


_R = TypeVar("_R", bound=type[Record])


def register(cls: _R) -> _R:
    assert cls.TYPE not in RECORD_CLASSES, cls
    RECORD_CLASSES[cls.TYPE] = cls
    return cls
