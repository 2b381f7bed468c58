"""Two real daemons on loopback move a running domain; nothing may be lost."""

from __future__ import annotations

import asyncio

from harness import DaemonProc

HOTSET = "hotset:size=64MiB,rate=100MB/s"


async def names(d: DaemonProc) -> list[tuple[str, str]]:
    return [(x["name"], x["state"]) for x in await d.call("list")]


async def test_live_migration_under_hotset_is_verified(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    await a.call("create", name="web1", memory=256, workload=HOTSET)
    await asyncio.sleep(0.5)
    before = (await a.call("stats", name="web1"))["stats"]
    assert before["pages_written"] > 0, "workload is not running"

    result = await a.call("migrate", name="web1", host=b.address, port=b.port, live=True, verify=True)

    assert result["status"] == "completed", result
    assert result["live"] is True
    assert result["verified"] is True
    assert result["iterations"] >= 2, "a live migration sends at least one precopy round and the final copy"
    assert result["pages_sent"] >= 65536
    assert result["downtime_ms"] > 0
    assert await names(a) == [], "the source copy must be gone"
    assert await names(b) == [("web1", "running")]
    check = await b.call("check", name="web1")
    assert check["ok"], check["problem"]
    # The guest goes on from where it stopped rather than starting over.
    assert check["stats"]["pages_written"] >= before["pages_written"]


async def test_non_live_migration_moves_every_page(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    await a.call("create", name="db1", memory=256, workload=HOTSET)
    await asyncio.sleep(0.3)
    result = await a.call("migrate", name="db1", host=b.address, port=b.port, live=False, verify=True, channels=3)
    assert result["status"] == "completed", result
    assert result["channels"] == 3
    assert result["live"] is False
    assert result["iterations"] == 1
    assert result["verified"] is True
    assert await names(b) == [("db1", "running")]
    check = await b.call("check", name="db1")
    assert check["ok"], check["problem"]
    # and back again
    result = await b.call("migrate", name="db1", host=a.address, port=a.port, live=True, channels=1)
    assert result["status"] == "completed", result
    assert result["channels"] == 1
    assert await names(a) == [("db1", "running")]
    assert await names(b) == []
    assert (await a.call("check", name="db1"))["ok"]
