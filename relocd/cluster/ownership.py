"""Who owns a domain in the cluster store, and the swaps of a handoff (docs/cluster.md).

The record is the arbiter of a handoff: a target resumes only once it has
*claimed* the domain from an *offer* naming its migration; a source whose
link dropped after GO either finds the domain claimed (and lets its copy
go) or *fences* the migration so that no claim can follow, and only then
resumes its own.  The decisions are pure functions of the record
(``decide_*``, tested without a store); ``Ownership`` runs them as
compare-and-swaps, reading again whenever a swap loses a race.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable
from typing import TypeVar

from relocd.cluster.store import DOMAINS, Store
from relocd.engine.faults import crash_point
from relocd.errors import DomainExists, RelocdError

#: fenced migrations a record remembers (a prepared target asleep for longer than this many moves is very late)
FENCED_KEPT = 16

_T = TypeVar("_T")


class RecordError(RelocdError):
    """An ownership record that is not one (written by something else)."""


@dataclasses.dataclass(frozen=True)
class OwnershipRecord:
    host: str
    epoch: int
    name: str = ""
    #: the migration that last changed the record
    migration: str | None = None
    #: the one migration whose target may claim the domain now
    offer: str | None = None
    #: migrations whose target may never claim it (newest last)
    fenced: tuple[str, ...] = ()
    #: the host the domain was claimed from (a failed resume gives it back there)
    source: str | None = None
    #: the source of ``migration`` has let its copy go: no giving back
    released: bool = False
    #: saved to a file on ``host`` and stopped there: a restore on any host may take it
    saved: bool = False

    def encode(self) -> bytes:
        doc = dataclasses.asdict(self)
        doc["fenced"] = list(self.fenced)
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> OwnershipRecord:
        try:
            doc = json.loads(raw)
            fenced = tuple(str(m) for m in doc.get("fenced", ()))
            rec = cls(
                host=str(doc["host"]), epoch=int(doc["epoch"]), name=str(doc.get("name", "")),
                migration=doc.get("migration"), offer=doc.get("offer"), fenced=fenced,
                source=doc.get("source"), released=bool(doc.get("released", False)),
                saved=bool(doc.get("saved", False)),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RecordError(f"not an ownership record: {raw[:80]!r}") from None
        return rec

    @property
    def state(self) -> str:
        """The record's state as docs/cluster.md names it."""
        if self.saved:
            return "saved"
        if self.offer is not None:
            return "offered"
        if self.source is not None and self.migration is not None:
            return "released" if self.released else "taken"
        if self.migration is not None and self.migration in self.fenced:
            return "fenced"
        return "owned"


def key_of(uuid: str) -> str:
    return DOMAINS + uuid


# -- decisions: record in, (answer, record to write or None) out ----------------------


class Settled(enum.Enum):
    """What a source whose link dropped after GO learns from the record."""

    TAKEN = "taken"  # the target claimed it: let our copy go
    FENCED = "fenced"  # the target never will: resume ours
    UNCLEAR = "unclear"  # the record says neither (changed by hand?): keep ours paused, ask again


Decision = tuple[_T, OwnershipRecord | None]


def decide_register(
    rec: OwnershipRecord | None, me: str, uuid: str, name: str, *, restore: bool = False
) -> Decision[None]:
    """create/restore/receive-without-a-record: ours, or refused if another host's.

    A saved record (its domain stopped, in a savefile) is taken by a restore
    on any host: the savefile is where the domain is, and whoever restores it
    first owns it (the epoch counts the change of owner).
    """
    if rec is None:
        return None, OwnershipRecord(host=me, epoch=1, name=name)
    if rec.saved and (restore or rec.host == me):
        epoch = rec.epoch if rec.host == me else rec.epoch + 1
        return None, OwnershipRecord(host=me, epoch=epoch, name=name, fenced=rec.fenced)
    if rec.host != me:
        if rec.saved:
            raise DomainExists(f"{uuid} ({rec.name or name}) was saved to a file on {rec.host}: restore it instead")
        raise DomainExists(f"{uuid} ({rec.name or name}) is owned by {rec.host} in the cluster store")
    return None, None


def decide_saved(rec: OwnershipRecord | None, me: str, name: str) -> Decision[None]:
    """A save that stopped the domain here: the savefile holds it now; a restore anywhere may claim it."""
    if rec is not None and (rec.host != me or rec.saved):
        return None, None  # saved already, or not ours to hand on (the record moved meanwhile, by hand?)
    if rec is None:
        return None, OwnershipRecord(host=me, epoch=1, name=name, saved=True)
    fenced = rec.fenced if rec.offer is None else (*rec.fenced, rec.offer)[-FENCED_KEPT:]
    return None, OwnershipRecord(host=me, epoch=rec.epoch, name=name, fenced=fenced, saved=True)


def decide_forget(rec: OwnershipRecord | None, me: str) -> bool:
    """destroy: delete the record when it is ours (another host's is none of this copy's business)."""
    return rec is not None and rec.host == me


def decide_withdraw(rec: OwnershipRecord | None, me: str, mid: str) -> Decision[None]:
    """A migration that ended with our copy running here: its offer, if still there, is fenced."""
    if rec is None or rec.host != me or rec.offer != mid:
        return None, None
    return None, dataclasses.replace(rec, offer=None, fenced=(*rec.fenced, mid)[-FENCED_KEPT:])


def decide_offer(rec: OwnershipRecord | None, me: str, uuid: str, name: str, mid: str) -> Decision[None]:
    """Before GO: only this migration's target may claim the domain now."""
    if rec is None:
        return None, OwnershipRecord(host=me, epoch=1, name=name, migration=mid, offer=mid)
    if rec.host != me:
        raise DomainExists(f"{uuid} ({rec.name or name}) is owned by {rec.host} in the cluster store, not by this host")
    if rec.offer == mid:
        return None, None
    # A stale offer (its source failed after offering, before GO) is fenced
    # as it is superseded: its prepared target drops its copy, never claims.
    fenced = rec.fenced if rec.offer is None else (*rec.fenced, rec.offer)[-FENCED_KEPT:]
    return None, dataclasses.replace(
        rec, name=name, migration=mid, offer=mid, fenced=fenced, source=None, released=False, saved=False
    )


def decide_claim(rec: OwnershipRecord | None, me: str, mid: str) -> Decision[bool]:
    """On GO, before the resume: True once the domain is ours for ``mid``; False: we lost."""
    if rec is not None and rec.host == me and rec.migration == mid and rec.offer is None and mid not in rec.fenced:
        return True, None  # our claim, whose answer we missed (or a restart finishing it)
    if rec is None or rec.offer != mid:
        return False, None
    return True, OwnershipRecord(
        host=me, epoch=rec.epoch + 1, name=rec.name, migration=mid, fenced=rec.fenced, source=rec.host
    )


def decide_settle(rec: OwnershipRecord | None, me: str, mid: str) -> Decision[Settled]:
    """The source after GO, without its peer: taken (released now) or fenced (fenced now)."""
    if rec is None:
        return Settled.UNCLEAR, None
    if rec.host == me and rec.offer == mid:
        fenced = (*rec.fenced, mid)[-FENCED_KEPT:]
        return Settled.FENCED, dataclasses.replace(rec, offer=None, fenced=fenced)  # same epoch
    if rec.host == me and mid in rec.fenced:
        return Settled.FENCED, None  # our fence (answer missed), or a target that gave it back
    if rec.host != me and rec.migration == mid:
        return Settled.TAKEN, None if rec.released else dataclasses.replace(rec, released=True)
    return Settled.UNCLEAR, None


def decide_give_back(rec: OwnershipRecord | None, me: str, mid: str) -> Decision[bool]:
    """Our resume failed after the claim: True once the domain is the source's again."""
    if rec is None or rec.host != me or rec.migration != mid or rec.source is None:
        # not (any more) ours through this migration: nothing to give back
        return True, None
    if rec.released:
        return False, None  # the source let its copy go: ours is the only one
    fenced = (*rec.fenced, mid)[-FENCED_KEPT:]
    return True, OwnershipRecord(host=rec.source, epoch=rec.epoch + 1, name=rec.name, migration=mid, fenced=fenced)


def is_fenced(rec: OwnershipRecord | None, mid: str) -> bool:
    """A prepared target's check: has the source settled ``mid`` without us?"""
    return rec is not None and mid in rec.fenced and not (rec.offer == mid)


# -- the swaps -------------------------------------------------------------------------


class Ownership:
    """This host's view of the ownership records: the decisions above as swaps on a store."""

    def __init__(self, store: Store, me: str) -> None:
        self.store = store
        #: this host's name in the store (relocd-cluster-name)
        self.me = me

    async def read(self, uuid: str) -> tuple[OwnershipRecord | None, int]:
        entry = await self.store.get(key_of(uuid))
        if entry is None:
            return None, 0
        return OwnershipRecord.decode(entry.value), entry.mod_revision

    async def _update(
        self, uuid: str, side: str, op: str | Callable[[_T], str], decide: Callable[[OwnershipRecord | None], Decision[_T]]
    ) -> _T:
        """Read, decide, swap; a lost race reads again.  StoreUnavailable: nothing is known."""
        while True:
            rec, rev = await self.read(uuid)
            answer, new = decide(rec)
            if new is None:
                return answer
            name = op if isinstance(op, str) else op(answer)
            crash_point(side, f"store:{name}")
            if await self.store.swap(key_of(uuid), new.encode(), mod_revision=rev):
                crash_point(side, f"store:{name}:done")
                return answer

    async def register(self, uuid: str, name: str, *, restore: bool = False) -> None:
        op = "restore" if restore else "create"
        await self._update(uuid, "host", op, lambda r: decide_register(r, self.me, uuid, name, restore=restore))

    async def saved(self, uuid: str, name: str) -> None:
        await self._update(uuid, "host", "save", lambda r: decide_saved(r, self.me, name))

    async def withdraw(self, uuid: str, mid: str) -> None:
        await self._update(uuid, "source", "withdraw", lambda r: decide_withdraw(r, self.me, mid))

    async def forget(self, uuid: str) -> bool:
        """destroy: True once no record of ours is left (another host's stays)."""
        while True:
            rec, rev = await self.read(uuid)
            if not decide_forget(rec, self.me):
                return rec is None
            crash_point("host", "store:destroy")
            if await self.store.delete(key_of(uuid), mod_revision=rev):
                crash_point("host", "store:destroy:done")
                return True

    async def check_mine(self, uuid: str, name: str) -> None:
        """Read only: is the domain ours (or unrecorded)?  Before a migration starts."""
        rec, _ = await self.read(uuid)
        decide_register(rec, self.me, uuid, name)

    async def offer(self, uuid: str, name: str, mid: str) -> None:
        await self._update(uuid, "source", "offer", lambda r: decide_offer(r, self.me, uuid, name, mid))

    async def claim(self, uuid: str, mid: str) -> bool:
        return await self._update(uuid, "target", "claim", lambda r: decide_claim(r, self.me, mid))

    async def settle(self, uuid: str, mid: str) -> Settled:
        def op(verdict: Settled) -> str:
            return "release" if verdict == Settled.TAKEN else "fence"

        return await self._update(uuid, "source", op, lambda r: decide_settle(r, self.me, mid))

    async def give_back(self, uuid: str, mid: str) -> bool:
        return await self._update(uuid, "target", "giveback", lambda r: decide_give_back(r, self.me, mid))

    async def fenced(self, uuid: str, mid: str) -> bool:
        rec, _ = await self.read(uuid)
        return is_fenced(rec, mid)
