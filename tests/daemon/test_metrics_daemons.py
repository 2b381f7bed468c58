"""The metrics endpoint of real daemons (issue 12): scraped over HTTP after real work."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from harness import DaemonProc, free_port
from prometheus_client.parser import text_string_to_metric_families

from relocd.config.settings import Settings
from relocd.server.daemon import Daemon

HOTSET = "hotset:size=32MiB,rate=50MB/s"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_sync(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(port: int) -> Samples:
    return await asyncio.to_thread(scrape_sync, port)


def refuses(port: int) -> bool:
    """Nothing listens there (an HTTP error would mean something still does)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def sample(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no {name}{labels} in the scrape"
    return samples[key]


def with_metrics(tmp_path: Path, daemons: list[DaemonProc], name: str, address: str, extra: str = "") -> tuple[DaemonProc, int]:
    port = free_port()
    d = DaemonProc(tmp_path, name, address, extra_config=f"(relocd-metrics-address 127.0.0.1:{port})\n{extra}")
    daemons.append(d)
    d.start()
    return d, port


async def test_a_migration_is_counted_on_both_sides(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a, a_metrics = with_metrics(tmp_path, daemons, "hostA", "127.0.0.1")
    b, b_metrics = with_metrics(tmp_path, daemons, "hostB", "127.0.0.2")
    before = await scrape(a_metrics)
    assert sample(before, "relocd_migrations_total", direction="outgoing", status="completed") == 0
    assert sample(before, "relocd_migration_sent_bytes_total") == 0

    await a.call("create", name="web1", memory=64, workload=HOTSET)
    await asyncio.sleep(0.3)
    result = await a.call("migrate", name="web1", host=b.address, port=b.port, live=True)
    assert result["status"] == "completed", result

    src = await scrape(a_metrics)
    assert sample(src, "relocd_migrations_started_total", direction="outgoing") == 1
    assert sample(src, "relocd_migrations_total", direction="outgoing", status="completed") == 1
    assert sample(src, "relocd_migrations_total", direction="outgoing", status="failed") == 0
    assert sample(src, "relocd_migrations_total", direction="incoming", status="completed") == 0
    assert sample(src, "relocd_migration_sent_bytes_total") == result["bytes_sent"] > 0
    assert sample(src, "relocd_migration_sent_pages_total") == result["pages_sent"] > 0
    assert sample(src, "relocd_migration_downtime_seconds_count") == 1
    assert sample(src, "relocd_migration_downtime_seconds_sum") == pytest.approx(result["downtime_ms"] / 1000)
    assert sample(src, "relocd_migration_duration_seconds_sum") == pytest.approx(result["total_ms"] / 1000)
    assert sample(src, "relocd_migration_rounds_sum") == result["iterations"]

    # The target's session ends a moment after the source has its answer.
    deadline = time.monotonic() + 10
    while True:
        dst = await scrape(b_metrics)
        done = sample(dst, "relocd_migrations_total", direction="incoming", status="completed")
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert done == 1
    assert sample(dst, "relocd_migrations_started_total", direction="incoming") == 1
    assert sample(dst, "relocd_migrations_total", direction="outgoing", status="completed") == 0
    assert sample(dst, "relocd_migration_sent_bytes_total") == 0  # timings and traffic: the source's
    assert sample(dst, "relocd_migration_downtime_seconds_count") == 0

    for samples, d in ((src, a), (dst, b)):  # the gauges show what `relocd status` does
        status = await d.call("status")
        assert sample(samples, "relocd_reservations") == status["reservations"] == 0
        assert sample(samples, "relocd_reserved_memory_bytes") == 0
        assert sample(samples, "relocd_migrations_in_doubt", direction="incoming") == status["in_doubt_incoming"] == 0
        assert sample(samples, "relocd_migrations_in_doubt", direction="outgoing") == status["in_doubt_outgoing"] == 0


async def test_a_refused_peer_is_counted(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a, a_metrics = with_metrics(tmp_path, daemons, "hostA", "127.0.0.1")
    b, b_metrics = with_metrics(
        tmp_path, daemons, "hostB", "127.0.0.2", r"(xend-relocation-hosts-allow '^10\\.9\\.9\\.9$')"
    )
    await a.call("create", name="web1", memory=32, workload=HOTSET)
    result = await a.call("migrate", name="web1", host=b.address, port=b.port, live=True)
    assert result["status"] == "failed", result

    dst = await scrape(b_metrics)
    assert sample(dst, "relocd_peers_refused_total", reason="hosts_allow") == 1
    assert sample(dst, "relocd_peers_refused_total", reason="too_many_connections") == 0
    assert sample(dst, "relocd_migrations_started_total", direction="incoming") == 0
    src = await scrape(a_metrics)
    assert sample(src, "relocd_migrations_total", direction="outgoing", status="failed") == 1
    assert sample(src, "relocd_migrations_total", direction="outgoing", status="completed") == 0
    assert sample(src, "relocd_peers_refused_total", reason="hosts_allow") == 0


async def test_saves_and_restores_are_counted(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    d, port = with_metrics(tmp_path, daemons, "hostA", "127.0.0.1")
    await d.call("create", name="web1", memory=32, workload=HOTSET)
    file = tmp_path / "web1.save"
    assert (await d.call("save", name="web1", file=str(file), checkpoint=False))["status"] == "completed"
    await d.call("restore", file=str(file))
    with pytest.raises(Exception, match="already exists"):
        await d.call("restore", file=str(file))
    samples = await scrape(port)
    assert sample(samples, "relocd_saves_total", kind="save", status="completed") == 1
    assert sample(samples, "relocd_saves_total", kind="restore", status="completed") == 1
    assert sample(samples, "relocd_saves_total", kind="restore", status="failed") == 1
    assert sample(samples, "relocd_save_duration_seconds_count", kind="save") == 1
    assert sample(samples, "relocd_save_duration_seconds_sum", kind="save") > 0


async def test_shutdown_closes_the_endpoint(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    d, port = with_metrics(tmp_path, daemons, "hostA", "127.0.0.1")
    assert "relocd_migrations_total" in str(await scrape(port))
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 10
    assert refuses(port)
    assert '"metrics endpoint listening"' in d.log_text()


def in_process_settings(root: Path, name: str, port: int) -> Settings:
    return Settings(
        state_dir=root / name / "state",
        control_socket=root / name / "control.sock",
        metrics_address=("127.0.0.1", port),
    )


async def test_two_daemons_in_one_process_count_apart_and_shutdown_stops_each(tmp_path: Path) -> None:
    """In one process (where a leftover server thread would outlive its daemon)."""
    ports = free_port(), free_port()
    first, second = (Daemon(in_process_settings(tmp_path, n, p)) for n, p in zip(("one", "two"), ports))
    await first.startup()
    try:
        await second.startup()
        try:
            assert first.host is not None and second.host is not None
            first.host.notify("migration_started", direction="outgoing")
            one, two = await scrape(ports[0]), await scrape(ports[1])
            assert sample(one, "relocd_migrations_started_total", direction="outgoing") == 1
            assert sample(two, "relocd_migrations_started_total", direction="outgoing") == 0
        finally:
            await second.shutdown(grace=0)
        assert refuses(ports[1])
        assert sample(await scrape(ports[0]), "relocd_migrations_started_total", direction="outgoing") == 1
    finally:
        await first.shutdown(grace=0)
    assert refuses(ports[0])


def test_a_port_that_cannot_be_bound_fails_startup_with_one_line(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = DaemonProc(tmp_path, "hostA", "127.0.0.1", extra_config=f"(relocd-metrics-address 127.0.0.1:{port})")
        daemons.append(d)
        with pytest.raises(RuntimeError, match="exited at startup"):
            d.start()
    assert d.proc is not None and d.proc.wait(10) == 2
    log = d.log_text()
    line = f"relocd: relocd-metrics-address: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert line in log.splitlines(), log
    assert "Traceback" not in log


def test_metrics_are_off_by_default(host: DaemonProc) -> None:
    assert host.call_sync("status")["version"]
    assert "metrics endpoint" not in host.log_text()


async def test_a_failed_tls_handshake_is_counted(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    pytest.importorskip("cryptography")
    from relocd.tools.certs import make_ca, make_host_cert

    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki)
    files = make_host_cert(pki, "hostA", ips=("127.0.0.1",))
    tls_port = free_port()
    d, port = with_metrics(
        tmp_path, daemons, "hostA", "127.0.0.1",
        f"(xend-relocation-ssl-server yes)\n(xend-relocation-ssl-port {tls_port})\n"
        f"(xend-relocation-server-ssl-key-file '{files.key}')\n"
        f"(xend-relocation-server-ssl-cert-file '{files.cert}')\n"
        f"(relocd-relocation-ssl-ca-file '{ca.cert}')\n",
    )  # fmt: skip

    def plain_text_to_the_tls_port() -> None:
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as s:
            s.sendall(b"this is not a TLS client hello\r\n\r\n")
            while s.recv(4096):
                pass

    await asyncio.to_thread(plain_text_to_the_tls_port)
    deadline = time.monotonic() + 10
    while True:
        samples = await scrape(port)
        refused = sample(samples, "relocd_peers_refused_total", reason="tls_handshake")
        if refused or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert refused == 1
    assert sample(samples, "relocd_peers_refused_total", reason="hosts_allow") == 0
