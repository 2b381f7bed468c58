"""The ownership record's swaps (docs/cluster.md), against an in-memory store with faults."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from relocd.cluster.ownership import Ownership, OwnershipRecord, RecordError, Settled, key_of
from relocd.cluster.store import StoreUnavailable
from relocd.errors import DomainExists

from tests.unit.fakestore import MemoryStore

U = "7c0a4a8e-2f2b-4d3e-9a54-3f2d5b0e6a11"
M = "migration-1"
_T = TypeVar("_T")


def run(coro: Awaitable[_T]) -> _T:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def hosts(store: MemoryStore) -> tuple[Ownership, Ownership, Ownership]:
    return Ownership(store, "a"), Ownership(store, "b"), Ownership(store, "c")


def record(store: MemoryStore) -> OwnershipRecord:
    return OwnershipRecord.decode(store.data[key_of(U)].value)


def test_record_round_trips_and_rejects_garbage() -> None:
    rec = OwnershipRecord(host="a", epoch=3, name="vm", migration=M, fenced=("x", M), source="b", released=True)
    assert OwnershipRecord.decode(rec.encode()) == rec
    for raw in (b"", b"[]", b'{"host": "a"}', b'{"epoch": 1}'):
        with pytest.raises(RecordError):
            OwnershipRecord.decode(raw)


def test_register_then_another_host_is_refused(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.register(U, "vm"))  # ours already: fine (a restore of our own save)
    with pytest.raises(DomainExists, match="owned by a"):
        run(b.register(U, "vm"))
    assert record(store).host == "a" and record(store).epoch == 1


def test_handoff_moves_ownership_and_bumps_the_epoch(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.offer(U, "vm", M))
    assert record(store).state == "offered"
    assert run(b.claim(U, M)) is True
    rec = record(store)
    assert (rec.host, rec.epoch, rec.migration, rec.source, rec.state) == ("b", 2, M, "a", "taken")
    assert run(b.claim(U, M)) is True  # idempotent (a restart finishing it)


def test_claim_needs_the_offer_for_exactly_this_migration(store: MemoryStore) -> None:
    a, b, c = hosts(store)
    run(a.register(U, "vm"))
    assert run(b.claim(U, M)) is False  # nothing offered
    run(a.offer(U, "vm", "other"))
    assert run(b.claim(U, M)) is False  # offered to another migration
    assert run(c.claim(U, "other")) is True
    assert run(b.claim(U, "other")) is False  # c got it


def test_source_fences_and_the_late_claim_fails(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.offer(U, "vm", M))
    epoch = record(store).epoch
    assert run(a.settle(U, M)) == Settled.FENCED
    rec = record(store)
    assert rec.host == "a" and rec.epoch == epoch and M in rec.fenced  # same epoch
    assert run(b.claim(U, M)) is False
    assert run(b.fenced(U, M)) is True
    assert run(a.settle(U, M)) == Settled.FENCED  # asked again: same answer, no write


def test_source_finds_the_claim_and_releases(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.offer(U, "vm", M))
    assert run(b.claim(U, M))
    assert run(a.settle(U, M)) == Settled.TAKEN
    assert record(store).released
    assert run(b.give_back(U, M)) is False  # the source let its copy go: ours is the only one


def test_give_back_before_release_fences_the_migration(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.offer(U, "vm", M))
    assert run(b.claim(U, M))
    assert run(b.give_back(U, M)) is True
    rec = record(store)
    assert rec.host == "a" and M in rec.fenced
    assert run(a.settle(U, M)) == Settled.FENCED  # the source resumes its own
    assert run(b.claim(U, M)) is False


def test_a_slow_swap_is_read_again(store: MemoryStore) -> None:
    """Applied but the answer lost: the next try reads the record and knows."""
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.offer(U, "vm", M))
    store.slow = 1
    with pytest.raises(StoreUnavailable):
        run(b.claim(U, M))
    assert run(b.claim(U, M)) is True
    store.slow = 1
    with pytest.raises(StoreUnavailable):
        run(a.settle(U, M))
    assert run(a.settle(U, M)) == Settled.TAKEN


def test_a_slow_fence_is_read_again(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.offer(U, "vm", M))
    store.slow = 1
    with pytest.raises(StoreUnavailable):
        run(a.settle(U, M))
    assert run(a.settle(U, M)) == Settled.FENCED
    assert run(b.claim(U, M)) is False


def test_store_down_is_never_taken_for_an_answer(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    store.down = True
    for call in (a.offer(U, "vm", M), b.claim(U, M), a.settle(U, M), a.register(U, "vm")):
        with pytest.raises(StoreUnavailable):
            run(call)
    assert record(store).offer is None  # nothing was written


def test_a_race_between_claim_and_fence_has_one_winner(store: MemoryStore) -> None:
    a, b, _ = hosts(store)

    async def race() -> tuple[bool, Settled]:
        await a.register(U, "vm")
        await a.offer(U, "vm", M)
        claimed, settled = await asyncio.gather(b.claim(U, M), a.settle(U, M))
        return claimed, settled

    claimed, settled = run(race())
    assert (claimed, settled) in ((True, Settled.TAKEN), (False, Settled.FENCED))


def test_offer_refused_when_another_host_owns_it(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(b.register(U, "vm"))
    with pytest.raises(DomainExists, match="owned by b"):
        run(a.offer(U, "vm", M))
    with pytest.raises(DomainExists):
        run(a.check_mine(U, "vm"))


# -- destroy, save, restore (docs/cluster.md, "A domain's life outside a handoff") ----------


def test_destroy_forgets_our_record_and_frees_the_uuid(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    assert run(b.forget(U)) is False  # another host's record: not this copy's to delete
    assert key_of(U) in store.data
    assert run(a.forget(U)) is True
    assert key_of(U) not in store.data
    assert run(a.forget(U)) is True  # nothing left: done
    run(b.register(U, "vm"))  # the uuid is free in the fleet again
    assert record(store).host == "b"


def test_a_slow_delete_is_read_again(store: MemoryStore) -> None:
    a, _, _ = hosts(store)
    run(a.register(U, "vm"))
    store.slow = 1
    with pytest.raises(StoreUnavailable):
        run(a.forget(U))
    assert run(a.forget(U)) is True and key_of(U) not in store.data


def test_saved_on_a_restored_on_b_then_refused_on_c(store: MemoryStore) -> None:
    a, b, c = hosts(store)
    run(a.register(U, "vm"))
    run(a.saved(U, "vm"))
    rec = record(store)
    assert (rec.host, rec.epoch, rec.state) == ("a", 1, "saved")
    with pytest.raises(DomainExists, match="was saved to a file on a: restore it instead"):
        run(b.register(U, "vm"))  # a create of the uuid elsewhere: refused
    run(b.register(U, "vm", restore=True))
    rec = record(store)
    assert (rec.host, rec.epoch, rec.state) == ("b", 2, "owned")
    with pytest.raises(DomainExists, match="owned by b"):
        run(c.register(U, "vm", restore=True))  # the same file restored twice: one copy only
    with pytest.raises(DomainExists, match="owned by b"):
        run(a.register(U, "vm", restore=True))


def test_saved_and_restored_on_the_same_host_keeps_the_epoch(store: MemoryStore) -> None:
    a, _, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.saved(U, "vm"))
    run(a.saved(U, "vm"))  # again (its answer missed): no change
    run(a.register(U, "vm", restore=True))
    rec = record(store)
    assert (rec.host, rec.epoch, rec.saved) == ("a", 1, False)


def test_save_fences_a_stale_offer_and_restore_never_takes_what_is_not_saved(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.offer(U, "vm", M))  # the source failed after its offer, before GO
    run(a.saved(U, "vm"))
    rec = record(store)
    assert rec.offer is None and M in rec.fenced and rec.saved
    assert run(b.claim(U, M)) is False  # the old target can never take it now
    assert run(b.fenced(U, M)) is True  # and drops its prepared copy


def test_save_of_a_domain_without_a_record_leaves_one_saved(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.saved(U, "vm"))
    run(b.register(U, "vm", restore=True))
    assert record(store).host == "b"


# -- a stale offer (the source failed after its offer, before GO) ---------------------------


def test_the_next_offer_fences_a_stale_one(store: MemoryStore) -> None:
    a, b, c = hosts(store)
    run(a.register(U, "vm"))
    run(a.offer(U, "vm", M))
    run(a.offer(U, "vm", "migration-2"))
    rec = record(store)
    assert (rec.offer, rec.migration) == ("migration-2", "migration-2") and M in rec.fenced
    assert run(b.fenced(U, M)) is True  # the first target drops its prepared copy
    assert run(b.claim(U, M)) is False
    assert run(c.claim(U, "migration-2")) is True


def test_withdraw_fences_our_stale_offer_only(store: MemoryStore) -> None:
    a, b, _ = hosts(store)
    run(a.register(U, "vm"))
    run(a.withdraw(U, M))  # nothing offered: no write
    assert record(store).fenced == ()
    run(a.offer(U, "vm", M))
    run(a.withdraw(U, "other"))  # not this migration's offer: untouched
    assert record(store).offer == M
    run(a.withdraw(U, M))
    rec = record(store)
    assert rec.offer is None and rec.host == "a" and rec.epoch == 1 and M in rec.fenced and rec.state == "fenced"
    assert run(b.claim(U, M)) is False
    run(a.offer(U, "vm", "migration-2"))  # the domain moves on as usual
    assert run(b.claim(U, "migration-2")) is True
