"""The target's half of phase 2: may this domain come here, and for how long is room kept.

A RESERVE record carries a ``ReservationRequest`` as JSON from a peer we do
not trust yet, so every field is bounded by validation before any check
reads it: a request for 2**62 bytes is a malformed request, not a refusal
for lack of memory.  ``check_reservation`` then compares a well-formed
request with what this host has and refuses with the REFUSE reason code the
source shows to its operator.
"""

from __future__ import annotations

import math
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from relocd.drivers.base import INCOMING_SUFFIX, DomainConfig, Driver, HostCaps
from relocd.errors import ProtocolError, Reason, RelocdError, ReservationRefused
from relocd.units import PAGE_SIZE, format_bytes

#: Same bounds as DomainConfig: a request the target could never build is malformed.
MAX_MEMORY_BYTES = 1 << 42  # 4 TiB (DomainConfig: memory_mib <= 2**22)
MAX_VCPUS = 512
MAX_FEATURES = 1024
MAX_BRIDGES = 64
MAX_DISKS = 64

#: At most this many missing names are spelled out in a refusal.
_LISTED = 8

Token = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
#: an absolute path without control characters (no ``..`` component either: see _plain_paths)
DiskPath = Annotated[StrictStr, Field(min_length=2, max_length=4096, pattern=r"^/[^\x00-\x1f\x7f]+$")]


class ReservationRequest(BaseModel):
    """What the source asks the target to set aside (the RESERVE record's JSON)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: Token
    uuid: StrictStr = Field(max_length=64)
    memory_bytes: StrictInt = Field(ge=PAGE_SIZE, le=MAX_MEMORY_BYTES, multiple_of=PAGE_SIZE)
    vcpus: StrictInt = Field(ge=1, le=MAX_VCPUS)
    driver: StrictStr = Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_-]+$")
    cpu_features: tuple[Token, ...] = Field(default=(), max_length=MAX_FEATURES)
    bridges: tuple[Token, ...] = Field(default=(), max_length=MAX_BRIDGES)
    live: StrictBool = False
    #: the source will send a DIGEST: the target hashes its copy as soon as it is complete
    verify: StrictBool = False
    #: the source machine's boot id (same value: the two daemons share a hypervisor)
    host_id: StrictStr | None = Field(default=None, max_length=64)
    source_port: StrictInt | None = Field(default=None, ge=1, le=65535)
    #: page channels the source would like, the main connection included (protocol 1.1)
    channels: StrictInt = Field(default=1, ge=1, le=16)
    #: the source arbitrates the handoff by a cluster store (docs/cluster.md): so must the target
    cluster_store: StrictBool = False
    #: the domain's disks (paths); the target refuses unless it can open each.
    #: None: an older source that does not say, so nothing is checked
    disks: tuple[DiskPath, ...] | None = Field(default=None, max_length=MAX_DISKS)

    @field_validator("uuid")
    @classmethod
    def _canonical_uuid(cls, value: str) -> str:
        return str(uuidlib.UUID(value))

    @field_validator("disks")
    @classmethod
    def _plain_paths(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and any(".." in d.split("/") for d in value):
            raise ValueError("a disk path may not contain '..'")
        return value

    @classmethod
    def from_wire(cls, obj: object) -> ReservationRequest:
        """Validate a peer's JSON object; anything malformed is a ProtocolError."""
        if not isinstance(obj, dict):
            raise ProtocolError(f"reservation request is a {type(obj).__name__}, not an object")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise _protocol_error(exc) from None

    @classmethod
    def for_domain(
        cls, config: DomainConfig, *, live: bool, source_port: int | None = None
    ) -> ReservationRequest:
        """The request a source sends for one of its domains."""
        return cls(
            name=config.name,
            uuid=config.uuid,
            memory_bytes=config.memory_bytes,
            vcpus=config.vcpus,
            driver=config.driver,
            cpu_features=config.cpu_features,
            bridges=tuple(sorted({v.bridge for v in config.vifs if v.bridge})),
            live=live,
            source_port=source_port,
            disks=config.disks,
        )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _protocol_error(exc: ValidationError) -> ProtocolError:
    """One line naming the first bad field; the peer's values are never echoed."""
    errors = exc.errors(include_input=False, include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    limit_hit = first["type"] in {"less_than_equal", "too_long", "string_too_long"}
    return ProtocolError(
        f"bad reservation request: {where}: {first['msg']}{more}",
        reason=Reason.LIMIT if limit_hit else None,
    )


def _listing(names: Iterable[str]) -> str:
    items = sorted(names)
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} and {len(items) - _LISTED} more"


def check_reservation(
    req: ReservationRequest,
    caps: HostCaps,
    *,
    max_memory: int | None,
    reserved_bytes: int,
    existing_names: set[str],
    existing_uuids: set[str],
    unreachable_disks: Sequence[str] = (),
) -> None:
    """Refuse (ReservationRefused with its Reason) unless this host can take the domain.

    ``reserved_bytes`` is memory promised to other incoming migrations and
    not yet visible in ``caps.free_memory_bytes``; ``max_memory`` caps what
    incoming domains may reserve in all, these included (None: no cap).  The names and uuids should
    include those held by other reservations.  ``unreachable_disks``: what
    ``find_unreachable_disks(req, driver)`` found (awaited before, as it does I/O).
    """
    if req.driver != caps.driver:
        raise ReservationRefused(
            f"domain {req.name} needs driver {req.driver}, this host runs {caps.driver}",
            reason=Reason.DRIVER,
        )
    if req.name in existing_names or req.name + INCOMING_SUFFIX in existing_names:
        raise ReservationRefused(
            f"a domain named {req.name} already exists here", reason=Reason.NAME_EXISTS
        )
    if req.uuid in {u.lower() for u in existing_uuids}:
        raise ReservationRefused(
            f"a domain with uuid {req.uuid} already exists here", reason=Reason.NAME_EXISTS
        )
    if req.vcpus > caps.max_vcpus:
        raise ReservationRefused(
            f"domain {req.name} has {req.vcpus} vCPUs, this host allows {caps.max_vcpus}",
            reason=Reason.VCPUS,
        )
    available = max(0, caps.free_memory_bytes - reserved_bytes)
    held = f", {format_bytes(reserved_bytes)} held for other migrations" if reserved_bytes else ""
    room = None if max_memory is None else max(0, max_memory - reserved_bytes)
    if room is not None and room < available:
        limit = f"{format_bytes(max_memory or 0)} allowed for incoming domains in all{held}"
        available = room
    else:
        limit = f"{format_bytes(available)} free{held}"
    if req.memory_bytes > available:
        raise ReservationRefused(
            f"not enough memory for domain {req.name}: needs {format_bytes(req.memory_bytes)}, {limit}",
            reason=Reason.NO_MEMORY,
        )
    missing_features = set(req.cpu_features) - caps.cpu_features
    if missing_features:
        raise ReservationRefused(
            f"this host's CPU lacks features domain {req.name} may use: {_listing(missing_features)}",
            reason=Reason.CPU_FEATURES,
        )
    missing_bridges = set(req.bridges) - caps.bridges
    if missing_bridges:
        raise ReservationRefused(
            f"domain {req.name} needs bridges this host lacks: {_listing(missing_bridges)}",
            reason=Reason.NETWORK,
        )
    if unreachable_disks:
        # NETWORK: the one reason for "something the domain is attached to is missing here";
        # a reason code of its own would be news to older peers.
        raise ReservationRefused(
            f"domain {req.name} needs disks this host cannot open: {_listing(unreachable_disks)}",
            reason=Reason.NETWORK,
        )


async def find_unreachable_disks(req: ReservationRequest, driver: Driver) -> list[str]:
    """The request's disks that ``driver``'s host cannot open ([] when the request names none)."""
    if not req.disks:
        return []
    return await driver.unreachable_disks(req.disks)


@dataclass(frozen=True)
class Reservation:
    """Room held for one incoming migration until ``expires_at`` (table clock)."""

    migration_id: str
    request: ReservationRequest
    created_at: float
    expires_at: float


class ReservationTable:
    """Reservations held on this target, each kept alive by source activity.

    A source that goes quiet for ``timeout_s`` loses its reservation; the
    daemon polls ``expired()`` and tears down the half-built domains
    (engine/target.py ``expire_reservations``).  A prepared copy's
    reservation is pinned: it lasts until the source decides.
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError("reservation timeout must be positive")
        self.timeout_s = timeout_s
        self._clock = clock
        self._held: dict[str, Reservation] = {}

    def add(self, migration_id: str, req: ReservationRequest) -> Reservation:
        if migration_id in self._held:
            raise RelocdError(f"migration {migration_id} already holds a reservation")
        now = self._clock()
        res = Reservation(migration_id, req, created_at=now, expires_at=now + self.timeout_s)
        self._held[migration_id] = res
        return res

    def touch(self, migration_id: str) -> bool:
        """Push the expiry back (the source is alive); False if nothing is held."""
        res = self._held.get(migration_id)
        if res is None:
            return False
        self._held[migration_id] = replace(res, expires_at=self._clock() + self.timeout_s)
        return True

    def pin(self, migration_id: str) -> None:
        """The copy is prepared: only its source's GO or ABORT ends it now, never expiry."""
        res = self._held.get(migration_id)
        if res is not None:
            self._held[migration_id] = replace(res, expires_at=math.inf)

    def release(self, migration_id: str) -> Reservation | None:
        """Drop a reservation (done, failed or cleaned up); idempotent."""
        return self._held.pop(migration_id, None)

    def expired(self) -> list[Reservation]:
        """Remove and return the reservations past their expiry, for the caller to clean up.

        Each is returned once, so two sweeps never tear the same domain down twice.
        """
        now = self._clock()
        gone = [r for r in self._held.values() if r.expires_at <= now]
        for res in gone:
            del self._held[res.migration_id]
        return gone

    def get(self, migration_id: str) -> Reservation | None:
        return self._held.get(migration_id)

    def all(self) -> list[Reservation]:
        return list(self._held.values())

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, migration_id: object) -> bool:
        return migration_id in self._held

    @property
    def reserved_bytes(self) -> int:
        return sum(r.request.memory_bytes for r in self._held.values())

    @property
    def names(self) -> set[str]:
        return {r.request.name for r in self._held.values()}

    @property
    def uuids(self) -> set[str]:
        return {r.request.uuid for r in self._held.values()}
