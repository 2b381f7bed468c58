"""One claim per domain: the operation that holds it, and every other one refused.

An operation on a domain (migrate, save, destroy, pause, resume, check, the
settling of an in-doubt migration) takes the domain's claim synchronously,
before its first await, and holds it until the operation is concluded: two
migrations of one domain can no longer both pass a "not busy" check while
their connections open, and a ``resume`` cannot slip into a stop-and-copy.
The claim is keyed by uuid, so a rename (``NAME--migratedaway``) keeps it.
"""

from __future__ import annotations

import dataclasses

from relocd.errors import DomainBusy


@dataclasses.dataclass
class Claim:
    """Held by one operation on one domain; ``release`` is idempotent."""

    uuid: str
    name: str
    op: str
    #: the domain is on its way out (a migration or a save): `list` shows it migrating
    moving: bool = False
    _table: ClaimTable | None = dataclasses.field(default=None, repr=False)

    def release(self) -> None:
        table, self._table = self._table, None
        if table is not None:
            table._held.pop(self.uuid, None)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ClaimTable:
    """The host's claims, by domain uuid."""

    def __init__(self) -> None:
        self._held: dict[str, Claim] = {}

    def take(self, uuid: str, name: str, op: str, *, moving: bool = False) -> Claim:
        """Claim the domain for ``op`` or raise DomainBusy naming the holder (never awaits)."""
        holder = self._held.get(uuid)
        if holder is not None:
            raise DomainBusy(f"{name} is busy: {holder.op} in progress")
        claim = Claim(uuid, name, op, moving, self)
        self._held[uuid] = claim
        return claim

    def get(self, uuid: str) -> Claim | None:
        """The claim held on this domain, if any."""
        return self._held.get(uuid)

    def __len__(self) -> int:
        return len(self._held)
