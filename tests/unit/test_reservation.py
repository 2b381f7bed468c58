"""Reservation requests from hostile peers, refusals for each reason, the expiry table."""

from __future__ import annotations

from typing import Any

import pytest

from relocd.drivers.base import DomainConfig, HostCaps, Vif
from relocd.engine.reservation import (
    Reservation,
    ReservationRequest,
    ReservationTable,
    check_reservation,
)
from relocd.errors import ProtocolError, Reason, RelocdError, ReservationRefused

GiB = 1 << 30
UUID = "6f9619ff-8b86-d011-b42d-00cf4fc964ff"


def wire(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "web1",
        "uuid": UUID,
        "memory_bytes": 2 * GiB,
        "vcpus": 2,
        "driver": "sim",
        "cpu_features": ["sse2", "avx"],
        "bridges": ["xenbr0"],
        "live": True,
        "source_port": 8002,
    }
    base.update(overrides)
    return base


CAPS = HostCaps(
    driver="sim",
    free_memory_bytes=8 * GiB,
    max_vcpus=16,
    cpu_features=frozenset({"sse2", "avx", "avx2"}),
    bridges=frozenset({"xenbr0", "br1"}),
)


def check(req: ReservationRequest, caps: HostCaps = CAPS, **kw: Any) -> None:
    args: dict[str, Any] = {
        "max_memory": None,
        "reserved_bytes": 0,
        "existing_names": set(),
        "existing_uuids": set(),
    }
    args.update(kw)
    check_reservation(req, caps, **args)


def refusal(req: ReservationRequest, caps: HostCaps = CAPS, **kw: Any) -> ReservationRefused:
    with pytest.raises(ReservationRefused) as info:
        check(req, caps, **kw)
    assert "\n" not in info.value.message
    return info.value


# -- the request on the wire ----------------------------------------------------


def test_valid_request_round_trips() -> None:
    req = ReservationRequest.from_wire(wire())
    assert req.memory_bytes == 2 * GiB and req.cpu_features == ("sse2", "avx")
    assert ReservationRequest.from_wire(req.to_wire()) == req


def test_extra_fields_are_ignored_and_uuid_is_canonical() -> None:
    req = ReservationRequest.from_wire(wire(uuid=UUID.upper(), future_field={"x": 1}))
    assert req.uuid == UUID
    assert not hasattr(req, "future_field")


def test_optional_fields_default() -> None:
    obj = wire()
    for key in ("cpu_features", "bridges", "live", "source_port"):
        del obj[key]
    req = ReservationRequest.from_wire(obj)
    assert (req.cpu_features, req.bridges, req.live, req.source_port) == ((), (), False, None)


@pytest.mark.parametrize(
    "field, value",
    [
        ("memory_bytes", 2**62),
        ("memory_bytes", 0),
        ("memory_bytes", -4096),
        ("memory_bytes", 4097),  # not whole pages
        ("memory_bytes", "2147483648"),  # strings are not numbers
        ("memory_bytes", 2.0 * GiB),
        ("memory_bytes", True),
        ("vcpus", 10**6),
        ("vcpus", 0),
        ("name", ""),
        ("name", "a" * 65),
        ("name", "../../etc/passwd"),
        ("name", "web1\nroot"),
        ("uuid", "not-a-uuid"),
        ("driver", "Sim; rm -rf /"),
        ("cpu_features", ["ok"] * 5000),
        ("cpu_features", "sse2"),  # a string is not a list of features
        ("cpu_features", [1, 2]),
        ("bridges", ["x" * 100]),
        ("live", "yes"),
        ("source_port", 70000),
        ("name", None),
    ],
)
def test_hostile_requests_are_protocol_errors(field: str, value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        ReservationRequest.from_wire(wire(**{field: value}))
    assert field in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize("missing", ["name", "uuid", "memory_bytes", "vcpus", "driver"])
def test_missing_required_field(missing: str) -> None:
    obj = wire()
    del obj[missing]
    with pytest.raises(ProtocolError, match=missing):
        ReservationRequest.from_wire(obj)


@pytest.mark.parametrize("obj", [None, [], "x", 42])
def test_non_object_is_protocol_error(obj: Any) -> None:
    with pytest.raises(ProtocolError, match="not an object"):
        ReservationRequest.from_wire(obj)


def test_absurd_sizes_carry_the_limit_reason() -> None:
    with pytest.raises(ProtocolError) as info:
        ReservationRequest.from_wire(wire(memory_bytes=2**62))
    assert info.value.reason == Reason.LIMIT
    assert str(2**62) not in info.value.message  # the peer's value is not echoed
    with pytest.raises(ProtocolError) as info:
        ReservationRequest.from_wire(wire(uuid="zzz"))
    assert info.value.reason == Reason.PROTOCOL


def test_for_domain() -> None:
    cfg = DomainConfig(
        name="db",
        uuid=UUID,
        memory_mib=512,
        vcpus=4,
        cpu_features=("sse2",),
        vifs=(Vif(mac="00:16:3e:00:00:01", bridge="br1"), Vif(mac="00:16:3e:00:00:02")),
    )
    req = ReservationRequest.for_domain(cfg, live=True, source_port=8002)
    assert req.memory_bytes == 512 << 20 and req.vcpus == 4 and req.bridges == ("br1",)
    assert ReservationRequest.from_wire(req.to_wire()) == req


# -- checks against the host ----------------------------------------------------


def test_fitting_request_passes() -> None:
    check(ReservationRequest.from_wire(wire()))


def test_memory_refused_when_free_memory_is_short() -> None:
    exc = refusal(ReservationRequest.from_wire(wire(memory_bytes=9 * GiB)))
    assert exc.reason == Reason.NO_MEMORY
    assert "9.0 GiB" in exc.message and "8.0 GiB free" in exc.message


def test_memory_counts_other_reservations() -> None:
    req = ReservationRequest.from_wire(wire(memory_bytes=4 * GiB))
    check(req, reserved_bytes=4 * GiB)  # exactly fits
    exc = refusal(req, reserved_bytes=4 * GiB + 4096)
    assert exc.reason == Reason.NO_MEMORY and "held for other migrations" in exc.message


def test_memory_capped_by_max_memory() -> None:
    exc = refusal(ReservationRequest.from_wire(wire()), max_memory=GiB)
    assert exc.reason == Reason.NO_MEMORY and "allowed" in exc.message


def test_vcpus_refused() -> None:
    exc = refusal(ReservationRequest.from_wire(wire(vcpus=17)))
    assert exc.reason == Reason.VCPUS and "17" in exc.message


@pytest.mark.parametrize(
    "names, uuids",
    [({"web1"}, set()), ({"web1--incoming"}, set()), (set(), {UUID}), (set(), {UUID.upper()})],
)
def test_name_or_uuid_taken(names: set[str], uuids: set[str]) -> None:
    exc = refusal(ReservationRequest.from_wire(wire()), existing_names=names, existing_uuids=uuids)
    assert exc.reason == Reason.NAME_EXISTS


def test_other_names_do_not_clash() -> None:
    check(ReservationRequest.from_wire(wire()), existing_names={"web10", "web1--migratedaway"})


def test_cpu_features_missing_are_listed() -> None:
    req = ReservationRequest.from_wire(wire(cpu_features=["sse2", "avx512f", "amx"]))
    exc = refusal(req)
    assert exc.reason == Reason.CPU_FEATURES
    assert "amx, avx512f" in exc.message and "sse2" not in exc.message


def test_many_missing_features_are_abbreviated() -> None:
    req = ReservationRequest.from_wire(wire(cpu_features=[f"f{i:02d}" for i in range(30)]))
    exc = refusal(req)
    assert "and 22 more" in exc.message and len(exc.message) < 200


def test_target_with_more_features_accepts() -> None:
    check(ReservationRequest.from_wire(wire(cpu_features=["avx"])))


def test_driver_mismatch() -> None:
    exc = refusal(ReservationRequest.from_wire(wire(driver="kvm")))
    assert exc.reason == Reason.DRIVER and "kvm" in exc.message


def test_missing_bridge() -> None:
    exc = refusal(ReservationRequest.from_wire(wire(bridges=["xenbr0", "storage"])))
    assert exc.reason == Reason.NETWORK and "storage" in exc.message


# -- the table ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_table_accounting() -> None:
    table = ReservationTable(30, FakeClock())
    a = ReservationRequest.from_wire(wire())
    b = ReservationRequest.from_wire(
        wire(name="db", uuid="11111111-2222-3333-4444-555555555555", memory_bytes=GiB)
    )
    table.add("m1", a)
    table.add("m2", b)
    assert len(table) == 2 and "m1" in table
    assert table.reserved_bytes == 3 * GiB
    assert table.names == {"web1", "db"}
    assert table.uuids == {UUID, "11111111-2222-3333-4444-555555555555"}
    with pytest.raises(RelocdError):
        table.add("m1", a)
    released = table.release("m1")
    assert isinstance(released, Reservation) and released.request == a
    assert table.release("m1") is None
    assert table.reserved_bytes == GiB and table.names == {"db"}


def test_table_expiry_and_touch() -> None:
    clock = FakeClock()
    table = ReservationTable(30, clock)
    req = ReservationRequest.from_wire(wire())
    res = table.add("m1", req)
    assert res.expires_at == 1030.0
    table.add("m2", ReservationRequest.from_wire(wire(name="other", uuid=str(UUID[:-1] + "0"))))
    clock.now += 20
    assert table.touch("m1") is True
    assert table.touch("nope") is False
    clock.now += 15  # m2 quiet for 35 s, m1 for 15 s
    gone = table.expired()
    assert [r.migration_id for r in gone] == ["m2"]
    assert table.expired() == []  # handed out once
    assert "m2" not in table and "m1" in table
    clock.now += 30
    assert [r.migration_id for r in table.expired()] == ["m1"]
    assert len(table) == 0 and table.reserved_bytes == 0


def test_table_feeds_the_checks() -> None:
    table = ReservationTable(30, FakeClock())
    table.add("m1", ReservationRequest.from_wire(wire(memory_bytes=6 * GiB)))
    again = ReservationRequest.from_wire(wire(memory_bytes=GiB))
    exc = refusal(again, existing_names=table.names, existing_uuids=table.uuids)
    assert exc.reason == Reason.NAME_EXISTS
    other = ReservationRequest.from_wire(
        wire(name="x", uuid="11111111-2222-3333-4444-555555555555", memory_bytes=3 * GiB)
    )
    exc = refusal(other, reserved_bytes=table.reserved_bytes)
    assert exc.reason == Reason.NO_MEMORY


def test_max_memory_is_a_total_over_incoming_domains() -> None:
    """relocd-max-memory caps what incoming domains reserve in all (docs/config.md),
    not each one: a request that fits alone is refused when others hold the rest."""
    req = ReservationRequest.from_wire(wire(memory_bytes=GiB))
    check(req, max_memory=2 * GiB, reserved_bytes=GiB)  # 1 GiB held + 1 GiB asked = the cap
    exc = refusal(req, max_memory=2 * GiB, reserved_bytes=GiB + (1 << 20))
    assert exc.reason == Reason.NO_MEMORY
    assert "in all" in exc.message and "held for other migrations" in exc.message


def test_pinned_reservation_never_expires() -> None:
    """A prepared copy's room lasts until its source decides, however long."""
    now = [0.0]
    table = ReservationTable(5, clock=lambda: now[0])
    req = ReservationRequest.from_wire(wire())
    table.add("a", req)
    table.add("b", req.model_copy(update={"name": "other", "uuid": "1" * 32}))
    table.pin("a")
    now[0] = 3600.0
    assert [r.migration_id for r in table.expired()] == ["b"]
    assert "a" in table


def test_expiry_sweep_ends_the_quiet_session() -> None:
    """The daemon's sweep (expire_reservations) ends the session that holds an
    expired reservation; a pinned (prepared) one is left alone."""
    from relocd.engine.target import TargetContext, expire_reservations

    now = [0.0]
    ctx = TargetContext(drivers={}, reservations=ReservationTable(5, clock=lambda: now[0]), journal=None)  # type: ignore[arg-type]
    req = ReservationRequest.from_wire(wire())
    ended: list[str] = []

    class Session:
        def __init__(self, mid: str) -> None:
            self.mid = mid

        def expire(self) -> None:
            ended.append(self.mid)

    for mid in ("quiet", "prepared"):
        ctx.reservations.add(mid, req)
        ctx.sessions[mid] = Session(mid)  # type: ignore[assignment]
    ctx.reservations.pin("prepared")
    now[0] = 4.0
    assert expire_reservations(ctx) == 0 and ended == []
    now[0] = 6.0
    assert expire_reservations(ctx) == 1 and ended == ["quiet"]
    assert "prepared" in ctx.reservations and "quiet" not in ctx.reservations
