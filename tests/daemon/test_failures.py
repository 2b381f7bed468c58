"""Refusals, hostile peers and a dying target: the domain keeps running on exactly one host."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

from harness import DaemonProc, free_port

HOTSET = "hotset:size=16MiB,rate=50MB/s"


async def listing(d: DaemonProc) -> list[tuple[str, str]]:
    return [(x["name"], x["state"]) for x in await d.call("list")]


def start_pair(tmp_path: Path, daemons: list[DaemonProc], b_config: str = "") -> tuple[DaemonProc, DaemonProc]:
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2", extra_config=b_config)
    daemons.extend([a, b])
    a.start()
    b.start()
    return a, b


async def test_reservation_refused_for_memory(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a, b = start_pair(tmp_path, daemons, "(relocd-max-memory 128MiB)")
    await a.call("create", name="big", memory=256, workload=HOTSET)
    result = await a.call("migrate", name="big", host=b.address, port=b.port, live=True)
    assert result["status"] == "failed"
    assert "memory" in result["error"]
    assert await listing(a) == [("big", "running")]
    assert await listing(b) == []


async def test_disallowed_peer_is_dropped_before_parsing(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a, b = start_pair(tmp_path, daemons, r"(xend-relocation-hosts-allow '^10\.9\.9\.9$ ^nosuchhost\.example$')")
    await a.call("create", name="web", memory=32, workload=HOTSET)
    result = await a.call("migrate", name="web", host=b.address, port=b.port, live=True)
    assert result["status"] == "failed", result
    assert await listing(a) == [("web", "running")]
    assert await listing(b) == []
    assert "refused by hosts-allow" in b.log_text()


async def test_garbage_spewing_client_does_not_hurt_the_daemon(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a, b = start_pair(tmp_path, daemons)
    loop = asyncio.get_running_loop()

    def spew(payload: bytes) -> None:
        with socket.create_connection((b.address, b.port), timeout=5) as s:
            try:
                s.sendall(payload)
                s.settimeout(5)
                while s.recv(65536):
                    pass
            except OSError:
                pass  # the daemon hung up on us: that is the point

    garbage = [
        os.urandom(1 << 20),
        b"GET / HTTP/1.0\r\n\r\n",
        b"\x89RLCD\r\n\x1a" + b"\x01\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00",  # HELLO claiming 4 GiB
        b"\x89RLCD\r\n\x1a" + b"\x7f" * 64,  # unknown record type
    ]
    await asyncio.gather(*(loop.run_in_executor(None, spew, g) for g in garbage))
    assert b.alive
    await a.call("create", name="web", memory=32, workload=HOTSET)
    result = await a.call("migrate", name="web", host=b.address, port=b.port, live=True, verify=True)
    assert result["status"] == "completed", result
    assert await listing(b) == [("web", "running")]


async def test_target_killed_during_precopy(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a, b = start_pair(tmp_path, daemons)
    await a.call("create", name="web", memory=256, workload=HOTSET)
    migration = asyncio.create_task(
        a.call("migrate", name="web", host=b.address, port=b.port, live=True, max_bandwidth="40MB/s")
    )
    for _ in range(100):  # wait until the incoming domain shows on the target
        await asyncio.sleep(0.1)
        if ("web--incoming", "incoming") in await listing(b):
            break
    else:
        raise AssertionError("the target never showed the incoming domain")
    states = dict(await listing(a))
    assert states == {"web": "migrating"}
    b.kill()
    result = await asyncio.wait_for(migration, 60)
    assert result["status"] == "rolled-back", result
    assert await listing(a) == [("web", "running")]
    check = await a.call("check", name="web")
    assert check["ok"], check["problem"]
    # The restarted target finds the half-received domain and removes it.
    b.start()
    assert await listing(b) == []


async def test_sigterm_lets_the_daemon_stop_cleanly(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    daemons.append(a)
    a.start()
    await a.call("create", name="web", memory=32, workload=HOTSET)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(30) == 0
    assert not a.control.exists(), "the control socket is removed on shutdown"
    # The domain outlives the daemon, and a new daemon finds it again.
    a.start()
    assert await listing(a) == [("web", "running")]
    assert free_port()  # sanity: helper still usable


async def test_reservation_expires_when_the_source_goes_quiet(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    import uuid as uuidlib

    from relocd.protocol.codec import PREAMBLE, encode
    from relocd.protocol.records import Feature, Hello, Reserve, Role

    b = DaemonProc(tmp_path, "hostB", "127.0.0.2", extra_config="(relocd-reservation-timeout 2)")
    daemons.append(b)
    b.start()
    mid = uuidlib.uuid4()
    request = {
        "name": "quiet", "uuid": str(uuidlib.uuid4()), "memory_bytes": 32 << 20, "vcpus": 1,
        "driver": "sim", "cpu_features": [], "bridges": [], "live": True,
    }  # fmt: skip
    reader, writer = await asyncio.open_connection(b.address, b.port)
    writer.write(PREAMBLE + encode(Hello(1, 0, Feature.ZERO_PAGES, Role.SOURCE, mid.bytes, "test")))
    writer.write(encode(Reserve(request)))
    await writer.drain()
    await reader.readexactly(8 + 12)  # the target's preamble and HELLO header
    for _ in range(50):  # the domain is built once the reservation is granted
        if await listing(b) == [("quiet--incoming", "incoming")]:
            break
        await asyncio.sleep(0.05)
    assert await listing(b) == [("quiet--incoming", "incoming")]
    # and now we say nothing: the reservation must lapse
    for _ in range(60):
        await asyncio.sleep(0.1)
        if await listing(b) == []:
            break
    assert await listing(b) == [], "the half-built domain outlived its reservation"
    assert (await b.call("status"))["incoming"] == 0
    writer.close()
