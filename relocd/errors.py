"""One exception tree for the whole daemon.

Every error an operator can see derives from RelocdError and carries a one-line
message that is printed as-is (never a traceback).  Errors that travel on the
wire carry the reason code that goes into a REFUSE or ABORT record.
"""

from __future__ import annotations

import enum


class Reason(enum.IntEnum):
    """Machine-readable reason codes carried by REFUSE and ABORT records."""

    UNSPECIFIED = 0
    PROTOCOL = 1  # a record out of order, malformed, or failing its check
    VERSION = 2  # incompatible protocol major version
    ACCESS = 3  # refused by hosts-allow or TLS policy
    BUSY = 4  # too many concurrent incoming migrations
    NO_MEMORY = 5  # not enough memory for the reservation
    VCPUS = 6  # more vCPUs than the host allows
    NAME_EXISTS = 7  # a domain with this name or uuid already exists
    CPU_FEATURES = 8  # the source CPU has features the target lacks
    DRIVER = 9  # driver type not available on the target
    NETWORK = 10  # a bridge or network the domain needs is missing
    TIMEOUT = 11  # the peer went quiet
    VERIFY = 12  # memory digest mismatch
    DRIVER_ERROR = 13  # the hypervisor driver failed
    SHUTDOWN = 14  # the daemon is shutting down
    CANCELLED = 15  # cancelled by the operator
    LIMIT = 16  # a configured limit (frame size, absurd size) was exceeded
    INTERNAL = 17  # a bug on the sending side


class RelocdError(Exception):
    """Base of every error relocd raises on purpose."""

    reason: Reason = Reason.UNSPECIFIED

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class ConfigError(RelocdError):
    """A bad config file or option; the message reads 'FILE line N: reason'."""


class ProtocolError(RelocdError):
    """Somebody broke the wire protocol.

    ``remote`` says who: True when the peer sent something invalid, False when
    we were about to send something the state machine forbids (a local bug).
    """

    reason = Reason.PROTOCOL

    def __init__(
        self, message: str, *, remote: bool = True, reason: Reason | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.remote = remote


class AccessDenied(RelocdError):
    """A peer is not allowed to talk to us."""

    reason = Reason.ACCESS


class ReservationRefused(RelocdError):
    """The target refused to reserve resources for the domain."""


class MigrationAborted(RelocdError):
    """A migration was aborted (by us or the peer); the source keeps the domain."""


class DriverError(RelocdError):
    """The hypervisor driver failed."""

    reason = Reason.DRIVER_ERROR


class DomainNotFound(RelocdError):
    """No domain by that name."""


class DomainExists(RelocdError):
    """A domain with that name or uuid already exists."""

    reason = Reason.NAME_EXISTS


class SaveFileError(RelocdError):
    """A savefile is truncated, corrupted, foreign or from a newer version."""


class DomainBusy(RelocdError):
    """Another operation holds the domain (one claim per domain, issue 11)."""

    reason = Reason.BUSY
