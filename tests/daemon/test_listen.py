"""Where a daemon listens: IPv6 and interface names, as xend-relocation-address allows."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from harness import DaemonProc, free_port

HOTSET = "hotset:size=8MiB,rate=20MB/s"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_migration_over_ipv6(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a = DaemonProc(tmp_path, "hostA", "::1")
    b = DaemonProc(tmp_path, "hostB", "::1")
    daemons.extend([a, b])
    a.start()
    b.start()
    await a.call("create", name="v6", memory=32, workload=HOTSET)
    result = await a.call("migrate", name="v6", host="::1", port=b.port, live=True, verify=True)
    assert result["status"] == "completed", result
    assert result["target"] == f"[::1]:{b.port}"
    assert [d["name"] for d in await b.call("list")] == ["v6"]


async def test_listens_only_on_the_configured_address(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2")
    daemons.append(b)
    b.start()
    with socket.create_connection(("127.0.0.2", b.port), timeout=2):
        pass
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", b.port), timeout=2).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="binding to an interface (SO_BINDTODEVICE) needs root")
async def test_interface_name_as_address(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "lo", port=free_port("127.0.0.1"))
    daemons.extend([a, b])
    a.start()
    b.start()
    status = await b.call("status")
    assert status["listen"], status
    await a.call("create", name="dev", memory=32, workload=HOTSET)
    result = await a.call("migrate", name="dev", host="127.0.0.1", port=b.port, live=False)
    assert result["status"] == "completed", result
