"""Metrics (issue 12): the option, and what each observed event does to the metrics."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.error
import urllib.request
import uuid as uuidlib
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relocd.config.options import parse_host_port
from relocd.config.settings import load_settings
from relocd.engine.host import Host
from relocd.engine.journal import SOURCE, TARGET, Journal, Phase
from relocd.engine.reservation import ReservationRequest, ReservationTable
from relocd.errors import ConfigError
from relocd.server.access import HostsAllow
from relocd.server.listener import RelocationListener, bind_socket
from relocd.server.metrics import REFUSAL_REASONS, Metrics, MetricsEndpoint


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relocd-config.sxp"
    path.write_text(text)
    return path


# --- relocd-metrics-address ------------------------------------------------------


def test_metrics_are_off_by_default() -> None:
    assert load_settings(None).metrics_address is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9782", ("127.0.0.1", 9782)),
        ("'[::1]:9782'", ("::1", 9782)),
        ("'[0:0::1]:9782'", ("::1", 9782)),
        ("'[::]:1'", ("::", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("localhost:9782", ("localhost", 9782)),
        ("''", None),
        ("none", None),
    ],
)
def test_metrics_address_values(tmp_path: Path, value: str, expected: tuple[str, int] | None) -> None:
    s = load_settings(write(tmp_path, f"# metrics\n(relocd-metrics-address {value})\n"))
    assert s.metrics_address == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("9782", "expected HOST:PORT"),
        (":9782", "expected HOST:PORT"),
        ("127.0.0.1:", "not a port number"),
        ("127.0.0.1:0", "not a port number (must be 1 to 65535)"),
        ("127.0.0.1:65536", "not a port number"),
        ("127.0.0.1:http", "not a port number"),
        ("::1:9782", "write an IPv6 address in brackets"),
        ("'[1.2.3.4]:9782'", "not an IPv6 address in brackets"),
        ("'[::1:9782'", "write an IPv6 address in brackets"),
        ("'bad host:9782'", "not an IP address or host name"),
        ("[::1]:9782", "quote a value that has brackets"),  # sxp splits at brackets
    ],
)
def test_bad_metrics_address_is_a_config_error_with_file_and_line(tmp_path: Path, value: str, reason: str) -> None:
    path = write(tmp_path, f"# metrics\n\n(relocd-metrics-address {value})\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.message.startswith(f"{path} line 3: relocd-metrics-address: "), info.value.message
    assert reason in info.value.message


def test_parse_host_port_directly() -> None:
    assert parse_host_port(" 10.0.0.1:80 ") == ("10.0.0.1", 80)
    with pytest.raises(ValueError):
        parse_host_port("[::1]")


# --- observed events -> metrics ----------------------------------------------------


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    assert v is not None, f"no sample {name}{labels}"
    return v


RESULT = {
    "status": "completed",
    "domain": "web1",
    "live": True,
    "iterations": 5,
    "pages_sent": 70000,
    "bytes_sent": 70000 * 4096,
    "total_ms": 2500.0,
    "downtime_ms": 42.5,
    "verified": True,
    "error": None,
}


def test_a_completed_outgoing_migration() -> None:
    m = Metrics()
    m.observe("migration_started", {"direction": "outgoing"})
    assert value(m, "relocd_migrations_started_total", direction="outgoing") == 1
    assert value(m, "relocd_migrations_total", direction="outgoing", status="completed") == 0
    m.observe("migration_finished", {"direction": "outgoing", "status": "completed", "result": RESULT})
    assert value(m, "relocd_migrations_total", direction="outgoing", status="completed") == 1
    assert value(m, "relocd_migrations_total", direction="incoming", status="completed") == 0
    assert value(m, "relocd_migration_sent_bytes_total") == 70000 * 4096
    assert value(m, "relocd_migration_sent_pages_total") == 70000
    assert value(m, "relocd_migration_downtime_seconds_count") == 1
    assert value(m, "relocd_migration_downtime_seconds_sum") == pytest.approx(0.0425)
    assert value(m, "relocd_migration_downtime_seconds_bucket", le="0.05") == 1
    assert value(m, "relocd_migration_downtime_seconds_bucket", le="0.025") == 0
    assert value(m, "relocd_migration_duration_seconds_sum") == pytest.approx(2.5)
    assert value(m, "relocd_migration_duration_seconds_bucket", le="2.5") == 1
    assert value(m, "relocd_migration_duration_seconds_bucket", le="1.0") == 0
    assert value(m, "relocd_migration_rounds_sum") == 5
    assert value(m, "relocd_migration_rounds_bucket", le="6.0") == 1
    assert value(m, "relocd_migration_rounds_bucket", le="4.0") == 0


@pytest.mark.parametrize("status", ["failed", "rolled-back", "cancelled"])
def test_an_outgoing_migration_that_did_not_complete(status: str) -> None:
    m = Metrics()
    result = dict(RESULT, status=status, error="it went wrong")
    m.observe("migration_finished", {"direction": "outgoing", "status": status, "result": result})
    assert value(m, "relocd_migrations_total", direction="outgoing", status=status) == 1
    assert value(m, "relocd_migrations_total", direction="outgoing", status="completed") == 0
    # The pages went over the wire all the same ...
    assert value(m, "relocd_migration_sent_bytes_total") == 70000 * 4096
    assert value(m, "relocd_migration_sent_pages_total") == 70000
    # ... but the timings and rounds describe completed moves only.
    assert value(m, "relocd_migration_downtime_seconds_count") == 0
    assert value(m, "relocd_migration_duration_seconds_count") == 0
    assert value(m, "relocd_migration_rounds_count") == 0


def test_an_outgoing_migration_without_a_result() -> None:
    m = Metrics()
    m.observe("migration_finished", {"direction": "outgoing", "status": "failed", "result": None})
    assert value(m, "relocd_migrations_total", direction="outgoing", status="failed") == 1
    assert value(m, "relocd_migration_sent_bytes_total") == 0


@pytest.mark.parametrize("status", ["completed", "failed", "rolled-back", "in-doubt"])
def test_incoming_migrations(status: str) -> None:
    m = Metrics()
    m.observe("migration_started", {"direction": "incoming"})
    m.observe("migration_finished", {"direction": "incoming", "status": status, "result": None})
    assert value(m, "relocd_migrations_started_total", direction="incoming") == 1
    assert value(m, "relocd_migrations_started_total", direction="outgoing") == 0
    assert value(m, "relocd_migrations_total", direction="incoming", status=status) == 1
    assert value(m, "relocd_migrations_total", direction="outgoing", status=status) == 0
    assert value(m, "relocd_migration_sent_bytes_total") == 0
    assert value(m, "relocd_migration_downtime_seconds_count") == 0


def test_saves_and_restores() -> None:
    m = Metrics()
    m.observe("save_finished", {"status": "completed", "seconds": 3.0})
    m.observe("save_finished", {"status": "failed", "seconds": 0.01})
    m.observe("restore_finished", {"status": "completed", "seconds": 0.2})
    assert value(m, "relocd_saves_total", kind="save", status="completed") == 1
    assert value(m, "relocd_saves_total", kind="save", status="failed") == 1
    assert value(m, "relocd_saves_total", kind="restore", status="completed") == 1
    assert value(m, "relocd_saves_total", kind="restore", status="failed") == 0
    assert value(m, "relocd_save_duration_seconds_count", kind="save") == 1  # completed ones only
    assert value(m, "relocd_save_duration_seconds_sum", kind="save") == pytest.approx(3.0)
    assert value(m, "relocd_save_duration_seconds_sum", kind="restore") == pytest.approx(0.2)
    assert value(m, "relocd_save_duration_seconds_bucket", kind="restore", le="0.25") == 1


def test_refused_peers_by_reason() -> None:
    m = Metrics()
    for reason in REFUSAL_REASONS:
        assert value(m, "relocd_peers_refused_total", reason=reason) == 0
    m.peer_refused("hosts_allow")
    m.peer_refused("hosts_allow")
    m.peer_refused("tls_handshake")
    assert value(m, "relocd_peers_refused_total", reason="hosts_allow") == 2
    assert value(m, "relocd_peers_refused_total", reason="tls_handshake") == 1
    assert value(m, "relocd_peers_refused_total", reason="too_many_connections") == 0


def test_unknown_events_are_ignored() -> None:
    m = Metrics()
    m.observe("something_new", {"direction": "outgoing"})
    assert value(m, "relocd_migrations_started_total", direction="outgoing") == 0


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # a second set of the same names does not clash
    a.observe("migration_started", {"direction": "outgoing"})
    assert value(a, "relocd_migrations_started_total", direction="outgoing") == 1
    assert value(b, "relocd_migrations_started_total", direction="outgoing") == 0
    assert REGISTRY.get_sample_value("relocd_migrations_started_total", {"direction": "outgoing"}) is None


# --- gauges read from the host ----------------------------------------------------------


def request(name: str, mib: int) -> ReservationRequest:
    return ReservationRequest(name=name, uuid=str(uuidlib.uuid4()), memory_bytes=mib << 20, vcpus=1, driver="sim")


def make_host(tmp_path: Path) -> Host:
    return Host(drivers={}, reservations=ReservationTable(30.0), journal=Journal(tmp_path / "journal.sqlite"))


def test_gauges_are_read_from_the_host_at_scrape_time(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    m = Metrics(host)
    assert value(m, "relocd_reservations") == 0
    assert value(m, "relocd_migrations_in_doubt", direction="incoming") == 0
    assert value(m, "relocd_migrations_in_doubt", direction="outgoing") == 0

    host.reservations.add("m1", request("web1", 64))
    host.reservations.add("m2", request("web2", 128))
    host.in_doubt["m2"] = object()  # type: ignore[assignment]  # only counted
    for mid, phase in (("s1", Phase.GO_SENT), ("s2", Phase.ABORTED), ("s3", Phase.STREAMING), ("s4", None)):
        host.journal.begin(mid, SOURCE, "dom-" + mid, str(uuidlib.uuid4()), "peer", True)
        if phase is not None:
            host.journal.set_phase(mid, phase)
    host.journal.begin("t1", TARGET, "dom-t1", str(uuidlib.uuid4()), "peer", True)

    assert value(m, "relocd_reservations") == 2
    assert value(m, "relocd_reserved_memory_bytes") == 192 << 20
    assert value(m, "relocd_migrations_in_doubt", direction="incoming") == 1
    assert value(m, "relocd_migrations_in_doubt", direction="outgoing") == 2  # GO_SENT and ABORTED
    counts = host.in_doubt_counts()  # the numbers `relocd status` reports
    assert counts == {"in_doubt": 3, "in_doubt_incoming": 1, "in_doubt_outgoing": 2}

    host.journal.finish("s1", "completed")
    host.reservations.release("m1")
    assert value(m, "relocd_reservations") == 1
    assert value(m, "relocd_migrations_in_doubt", direction="outgoing") == 1
    host.journal.close()


def test_host_observer_moves_the_counters(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    m = Metrics(host)
    host.observers.append(m.observe)
    host.notify("migration_started", direction="incoming")
    host.notify("migration_finished", direction="incoming", status="completed", result=None)
    assert value(m, "relocd_migrations_total", direction="incoming", status="completed") == 1
    host.journal.close()


# --- names and docs ---------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def exposed(m: Metrics) -> dict[str, str]:
    """name -> type of every relocd_ family in the exposition text."""
    text = generate_latest(m.registry).decode()
    return {f.name: f.type for f in text_string_to_metric_families(text) if f.name.startswith("relocd_")}


def test_metric_names_follow_prometheus_conventions(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    families = exposed(Metrics(host))
    assert families == {
        "relocd_migrations_started": "counter",
        "relocd_migrations": "counter",
        "relocd_migration_downtime_seconds": "histogram",
        "relocd_migration_duration_seconds": "histogram",
        "relocd_migration_rounds": "histogram",
        "relocd_migration_sent_bytes": "counter",
        "relocd_migration_sent_pages": "counter",
        "relocd_peers_refused": "counter",
        "relocd_saves": "counter",
        "relocd_save_duration_seconds": "histogram",
        "relocd_reservations": "gauge",
        "relocd_reserved_memory_bytes": "gauge",
        "relocd_migrations_in_doubt": "gauge",
    }
    for name, kind in families.items():
        assert re.fullmatch(r"relocd_[a-z_]+", name), name
        if kind == "counter":  # the parser strips _total; the exposition has it
            assert not name.endswith("_total"), name
        if "seconds" in name or "bytes" in name:
            assert name.endswith(("_seconds", "_bytes")), name
    text = generate_latest(Metrics(host).registry).decode()
    assert "relocd_migrations_total{" in text and "relocd_migration_sent_bytes_total " in text
    host.journal.close()


def test_every_metric_is_documented(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    docs = DOCS.read_text()
    rows = dict(re.findall(r"^\| `(relocd_[a-z_]+)(?:\{[^}]*\})?` \| (\w+) \|", docs, re.M))
    for name, kind in exposed(Metrics(host)).items():
        shown = name + "_total" if kind == "counter" else name
        assert shown in rows, f"{shown} is not in docs/operations.md's table"
        assert rows[shown] == kind, f"{shown}: documented as {rows[shown]}, is a {kind}"
    host.journal.close()


# --- the endpoint ---------------------------------------------------------------------------------


def scrape(address: tuple[str, int]) -> str:
    host, port = address
    where = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{where}:{port}/metrics", timeout=5) as reply:
        body: bytes = reply.read()
    return body.decode()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def test_endpoint_serves_and_stops() -> None:
    m = Metrics()
    m.peer_refused("hosts_allow")
    endpoint = MetricsEndpoint(m.registry, ("127.0.0.1", free_port()))
    endpoint.start()
    try:
        text = scrape(endpoint.address)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        assert samples[("relocd_peers_refused_total", (("reason", "hosts_allow"),))] == 1
    finally:
        endpoint.stop()
    with pytest.raises(urllib.error.URLError) as info:
        scrape(endpoint.address)
    assert isinstance(info.value.reason, ConnectionRefusedError)
    # The port is free again: a new endpoint can take it at once.
    again = MetricsEndpoint(m.registry, endpoint.address)
    again.start()
    again.stop()


def test_endpoint_on_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    endpoint = MetricsEndpoint(Metrics().registry, ("::1", port))
    endpoint.start()
    try:
        assert "relocd_migrations_total" in scrape(("::1", port))
    finally:
        endpoint.stop()


def test_endpoint_on_a_taken_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = MetricsEndpoint(Metrics().registry, ("127.0.0.1", port))
        with pytest.raises(ConfigError) as info:
            endpoint.start()
    assert info.value.message == f"relocd-metrics-address: cannot listen on 127.0.0.1:{port}: Address already in use"
    endpoint.stop()  # nothing to stop: harmless


# --- refused peers, from the listener ------------------------------------------------------------


async def connect_and_wait_for_close(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("patterns", "max_connections", "reason"),
    [
        ((r"^10\.9\.9\.9$",), 16, "hosts_allow"),
        ((), 0, "too_many_connections"),
    ],
)
async def test_listener_reports_refused_peers(patterns: tuple[str, ...], max_connections: int, reason: str) -> None:
    m = Metrics()
    served: list[str] = []

    async def handler(sock: socket.socket, peer: str) -> None:
        served.append(peer)

    listener = RelocationListener(
        bind_socket("127.0.0.1", 0),
        handler,
        hosts_allow=HostsAllow(patterns),
        dns_timeout=0.5,
        max_connections=max_connections,
        on_refused=m.peer_refused,
    )
    listener.start()
    try:
        assert await connect_and_wait_for_close(listener.address[1]) == b""
        for _ in range(100):  # the count follows the close by a step of the loop
            if value(m, "relocd_peers_refused_total", reason=reason):
                break
            await asyncio.sleep(0.01)
    finally:
        await listener.stop_accepting()
        await listener.drain(1)
    assert served == []
    assert value(m, "relocd_peers_refused_total", reason=reason) == 1
    others = set(REFUSAL_REASONS) - {reason}
    assert all(value(m, "relocd_peers_refused_total", reason=r) == 0 for r in others)


async def test_listener_counts_nothing_for_an_admitted_peer() -> None:
    m = Metrics()
    served: list[str] = []

    async def handler(sock: socket.socket, peer: str) -> None:
        served.append(peer)

    listener = RelocationListener(
        bind_socket("127.0.0.1", 0), handler, hosts_allow=HostsAllow(()), dns_timeout=0.5,
        max_connections=16, on_refused=m.peer_refused,
    )  # fmt: skip
    listener.start()
    try:
        await connect_and_wait_for_close(listener.address[1])
    finally:
        await listener.stop_accepting()
        await listener.drain(1)
    assert served == ["127.0.0.1"]
    assert all(value(m, "relocd_peers_refused_total", reason=r) == 0 for r in REFUSAL_REASONS)
