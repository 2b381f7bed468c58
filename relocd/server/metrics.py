"""The Prometheus endpoint (relocd-metrics-address): what this host did, and holds now.

Counters and histograms move when the host tells its observers that
something happened (``Host.notify``); the gauges are read from the host at
scrape time, so they cannot drift from what `relocd status` reports.  Each
daemon has a registry of its own, never prometheus_client's global one: two
daemons in one process (tests) count apart.  prometheus_client serves it
from a thread of its own, so a scrape never waits for the event loop, nor the
loop for a scrape.  docs/operations.md lists every metric.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relocd.engine.host import Host
from relocd.errors import ConfigError

__all__ = ["Metrics", "MetricsEndpoint", "REFUSAL_REASONS"]

# No NAME_created series beside each counter and histogram: in the text
# format they are gauges of their own that double the series for nothing a
# dashboard uses.  (A process-wide switch of the client library; relocd is
# its only user in the daemon.)
disable_created_metrics()  # type: ignore[no-untyped-call]

DIRECTIONS = ("incoming", "outgoing")
#: how a migration ends (engine/result.py; the journal's outcomes, and in-doubt
#: for an incoming one whose source never said GO or ABORT)
MIGRATION_STATUSES = ("completed", "failed", "rolled-back", "cancelled", "in-doubt")
SAVE_KINDS = ("save", "restore")
SAVE_STATUSES = ("completed", "failed")
#: why the relocation listeners turn a peer away before it is served
REFUSAL_REASONS = ("hosts_allow", "too_many_connections", "tls_handshake")

#: seconds; downtimes are tens to hundreds of milliseconds (relocd-downtime-ms: 300)
_DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: seconds; a migration or a save takes from a second to many minutes
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: precopy rounds plus the final copy (xend's limit is 29)
_ROUND_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 30, 50, 100)


class Metrics:
    """relocd's metrics, in a registry of their own; ``observe`` is a Host observer."""

    def __init__(self, host: Host | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations_started = Counter(
            "relocd_migrations_started", "Migrations begun, by direction", ["direction"], registry=r
        )
        self.migrations = Counter(
            "relocd_migrations", "Migrations ended, by direction and how they ended", ["direction", "status"], registry=r
        )
        self.downtime = Histogram(
            "relocd_migration_downtime_seconds",
            "Time the domain was paused, for each completed outgoing migration",
            buckets=_DOWNTIME_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "relocd_migration_duration_seconds",
            "Time from start to end of each completed outgoing migration",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.rounds = Histogram(
            "relocd_migration_rounds",
            "Rounds sent (precopy rounds and the final copy), for each completed outgoing migration",
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.sent_bytes = Counter(
            "relocd_migration_sent_bytes", "Bytes of memory sent by outgoing migrations, however they ended", registry=r
        )
        self.sent_pages = Counter(
            "relocd_migration_sent_pages", "Pages of memory sent by outgoing migrations, however they ended", registry=r
        )
        self.peers_refused = Counter(
            "relocd_peers_refused", "Peers turned away before being served, by reason", ["reason"], registry=r
        )
        self.saves = Counter("relocd_saves", "Saves and restores ended, by kind and how", ["kind", "status"], registry=r)
        self.save_duration = Histogram(
            "relocd_save_duration_seconds",
            "Time each completed save or restore took",
            ["kind"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        ProcessCollector(registry=r)
        # Every known series exists from the start, at 0, so rate() and
        # absent() behave before the first migration.
        for direction in DIRECTIONS:
            self.migrations_started.labels(direction)
            for status in MIGRATION_STATUSES:
                self.migrations.labels(direction, status)
        for reason in REFUSAL_REASONS:
            self.peers_refused.labels(reason)
        for kind in SAVE_KINDS:
            self.save_duration.labels(kind)
            for status in SAVE_STATUSES:
                self.saves.labels(kind, status)
        if host is not None:
            r.register(HostCollector(host))

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        """A ``Host.notify`` observer; events it does not know are ignored."""
        if event == "migration_started":
            self.migrations_started.labels(str(fields["direction"])).inc()
        elif event == "migration_finished":
            self._migration_finished(str(fields["direction"]), str(fields["status"]), fields.get("result"))
        elif event in ("save_finished", "restore_finished"):
            kind = event.removesuffix("_finished")
            status = str(fields["status"])
            self.saves.labels(kind, status).inc()
            if status == "completed":
                self.save_duration.labels(kind).observe(float(fields["seconds"]))

    def _migration_finished(self, direction: str, status: str, result: Mapping[str, Any] | None) -> None:
        self.migrations.labels(direction, status).inc()
        if result is None:  # incoming, or an outgoing one that crashed before it had a result
            return
        self.sent_bytes.inc(max(0, int(result.get("bytes_sent", 0))))
        self.sent_pages.inc(max(0, int(result.get("pages_sent", 0))))
        if status == "completed":
            self.downtime.observe(float(result.get("downtime_ms", 0.0)) / 1000)
            self.duration.observe(float(result.get("total_ms", 0.0)) / 1000)
            self.rounds.observe(int(result.get("iterations", 0)))

    def peer_refused(self, reason: str) -> None:
        """The listeners' ``on_refused`` callback."""
        self.peers_refused.labels(reason).inc()


class HostCollector(Collector):
    """Gauges read from the host at each scrape (in the endpoint's thread).

    Safe off the loop: ``len`` and ``list`` of the host's dicts are atomic
    under the GIL, and the journal serialises its own reads.
    """

    def __init__(self, host: Host) -> None:
        self.host = host

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        reservations = self.host.reservations.all()
        counts = self.host.in_doubt_counts()
        held, memory, in_doubt = self._families()
        held.add_metric([], len(reservations))
        memory.add_metric([], sum(r.request.memory_bytes for r in reservations))
        in_doubt.add_metric(["incoming"], counts["in_doubt_incoming"])
        in_doubt.add_metric(["outgoing"], counts["in_doubt_outgoing"])
        return [held, memory, in_doubt]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("relocd_reservations", "Reservations held for incoming migrations"),
            GaugeMetricFamily("relocd_reserved_memory_bytes", "Memory those reservations set aside"),
            GaugeMetricFamily(
                "relocd_migrations_in_doubt",
                "Migrations not yet settled with their peer (incoming: prepared copies waiting for GO or "
                "ABORT; outgoing: our own, asking the target after GO or to drop its copy)",
                labels=["direction"],
            ),
        )


class MetricsEndpoint:
    """``http://HOST:PORT/metrics``, served by prometheus_client in a thread."""

    def __init__(self, registry: CollectorRegistry, address: tuple[str, int]) -> None:
        self.registry = registry
        self.requested = address
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the bound port, after start)."""
        if self._server is None:
            return self.requested
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve; a ConfigError (one line) when the address cannot be had."""
        host, port = self.requested
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = exc.strerror or str(exc)
            raise ConfigError(f"relocd-metrics-address: cannot listen on {where}: {reason}") from None

    def stop(self) -> None:
        """Stop serving and close the socket (blocks for up to half a second)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
