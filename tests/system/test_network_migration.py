"""Ping a domain while two lab hosts' daemons live-migrate it (issue 5's end-to-end proof).

Each daemon runs inside its lab host's network namespace; the domain's vif
(a veth + namespace carrying its MAC and IP) is plugged into hostA's bridge,
then hostB's.  A client pings it every 10 ms across the switch.  With the
announce, the client sees it again within a few hundred milliseconds of the
resume; without it (and the domain silent), the switch still sends its
frames to hostA and the pings go unanswered.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from harness import DaemonProc  # noqa: E402

from relocd.server.network import netns_prefix_for  # noqa: E402
from tests.lab.netlab import NetLab  # noqa: E402

DOMAIN_IP = "10.77.0.50"
DOMAIN_MAC = "00:16:3e:77:00:50"
HOST_IP = {"hostA": "10.77.0.1", "hostB": "10.77.0.2"}
PORT = 8002


class LabDaemon(DaemonProc):
    """A relocd daemon started inside a lab host's network namespace."""

    def __init__(self, root: Path, name: str, netns: str, extra_config: str = "") -> None:
        super().__init__(
            root, name, HOST_IP[name], PORT, extra_config, argv_prefix=["ip", "netns", "exec", netns]
        )


def _remove_vif_namespaces(*daemons: DaemonProc) -> None:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    prefixes = tuple(netns_prefix_for(d.state_dir) + "-" for d in daemons)
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefixes):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def lab_pair(netlab: NetLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[NetLab, LabDaemon, LabDaemon]]:
    announce_rounds = getattr(request, "param", 5)
    for host, ns in netlab.hosts.items():
        netlab.run(ns, "ip", "addr", "add", f"{HOST_IP[host]}/24", "dev", "br0")
    a = LabDaemon(tmp_path, "hostA", netlab.hosts["hostA"])
    b = LabDaemon(tmp_path, "hostB", netlab.hosts["hostB"], f"(relocd-announce-rounds {announce_rounds})")
    try:
        a.start()
        b.start()
        yield netlab, a, b
    finally:
        a.cleanup()
        b.cleanup()
        _remove_vif_namespaces(a, b)


def migrate_while_pinging(lab: NetLab, a: LabDaemon, b: LabDaemon) -> dict[str, float]:
    a.call_sync(
        "create", name="web1", memory=32, workload="hotset:size=4MiB,rate=20MB/s",
        vifs=[f"mac={DOMAIN_MAC}, ip={DOMAIN_IP}, bridge=br0"],
    )  # fmt: skip
    with lab.ping(DOMAIN_IP, interval=0.01) as pinger:
        time.sleep(1.0)
        t_start = time.monotonic()
        result = a.call_sync("migrate", name="web1", host=HOST_IP["hostB"], port=PORT, live=True)
        t_done = time.monotonic()
        time.sleep(1.5)
        log = pinger.stop()
    assert result["status"] == "completed", result
    assert log.first_reply_after(t_start - 1.0) is not None, "the domain never answered on host A"
    # When the source heard RESUMED (the target resumed a round trip earlier).
    t_resume = t_start + float(result["timeline_ms"]["resumed"]) / 1000
    first = log.first_reply_after(t_resume)
    window = sorted((ts, seq in log.replied) for seq, ts in log.sent.items() if t_start <= ts < t_done + 1.0)
    longest = gap = 0
    for _, answered in window:
        gap = 0 if answered else gap + 1
        longest = max(longest, gap)
    numbers = {
        "downtime_ms": float(result["downtime_ms"]),
        "back_after_resume_ms": (first - t_resume) * 1000 if first is not None else float("inf"),
        "longest_outage_ms": longest * 10.0,
        "lost": float(sum(1 for _, ok in window if not ok)),
        "sent": float(len(window)),
    }
    print(f"\nping through a live migration: {numbers}")
    return numbers


@pytest.mark.parametrize("lab_pair", [5], indirect=True, ids=["announce"])
def test_ping_recovers_right_after_resume(lab_pair: tuple[NetLab, LabDaemon, LabDaemon]) -> None:
    lab, a, b = lab_pair
    numbers = migrate_while_pinging(lab, a, b)
    assert numbers["back_after_resume_ms"] < 500, numbers
    assert lab.fdb_port(lab.switch, DOMAIN_MAC) == lab.switch_port["hostB"]
    assert [d["name"] for d in b.call_sync("list")] == ["web1"]
    assert a.call_sync("list") == []


@pytest.mark.parametrize("lab_pair", [0], indirect=True, ids=["no-announce"])
def test_without_announce_the_switch_keeps_the_old_port(lab_pair: tuple[NetLab, LabDaemon, LabDaemon]) -> None:
    lab, a, b = lab_pair
    numbers = migrate_while_pinging(lab, a, b)
    assert numbers["back_after_resume_ms"] > 1000, numbers
    assert lab.fdb_port(lab.switch, DOMAIN_MAC) == lab.switch_port["hostA"]
