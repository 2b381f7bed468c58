"""sd_notify against a fake systemd: a datagram socket we bind ourselves."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relocd.server import sdnotify
from relocd.server.sdnotify import (
    Activity,
    SdNotifier,
    ServiceStatus,
    format_fields,
    keep_informed,
    reloading_fields,
    watchdog_interval_s,
)


@pytest.fixture
def fake_systemd() -> Iterator[tuple[str, socket.socket]]:
    d = Path(tempfile.mkdtemp(prefix="sd", dir="/tmp"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(d / "notify"))
    sock.settimeout(2)
    yield str(d / "notify"), sock
    sock.close()
    shutil.rmtree(d, ignore_errors=True)


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_reaches_the_socket(fake_systemd: tuple[str, socket.socket]) -> None:
    path, sock = fake_systemd
    notifier = SdNotifier(path)
    assert notifier.enabled
    assert notifier.ready("listening on :8002")
    assert received(sock) == {
        "READY": "1", "STATUS": "listening on :8002", "MAINPID": str(os.getpid())}
    notifier.close()


def test_stopping_status_watchdog(fake_systemd: tuple[str, socket.socket]) -> None:
    path, sock = fake_systemd
    notifier = SdNotifier(path)
    assert notifier.stopping("draining 2 migrations")
    assert received(sock) == {"STOPPING": "1", "STATUS": "draining 2 migrations"}
    assert notifier.status("3 domains")
    assert received(sock) == {"STATUS": "3 domains"}
    assert notifier.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}


def test_module_notify_uses_environment(
    fake_systemd: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = fake_systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setattr(sdnotify, "_default", None)
    assert sdnotify.notify(READY=1, STATUS="up")  # the daemon's spelling works too
    assert received(sock) == {"READY": "1", "STATUS": "up"}
    monkeypatch.setattr(sdnotify, "_default", None)


def test_abstract_namespace_socket() -> None:
    name = f"relocd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert SdNotifier("@" + name).notify(ready=True)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_no_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SdNotifier()
    assert not notifier.enabled
    assert notifier.ready() is False


@pytest.mark.parametrize("where", ["/nonexistent/notify", "@no-such-relocd-socket", "vsock:2:3"])
def test_unreachable_socket_never_raises(where: str) -> None:
    assert SdNotifier(where).notify(ready=True, status="x") is False


def test_format_fields() -> None:
    assert format_fields({"ready": True, "status": "a\nb", "errno": 0, "skip": None}) == (
        b"READY=1\nSTATUS=a b\nERRNO=0")
    assert format_fields({"stopping": False}) == b""


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert watchdog_interval_s() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval_s() is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 5.0


# --- the watchdog and STATUS= (keep_informed, ServiceStatus) ------------------------


def pending(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on the socket, without blocking."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2)


async def test_watchdog_pings_stop_while_the_loop_is_blocked(
    fake_systemd: tuple[str, socket.socket],
) -> None:
    path, sock = fake_systemd
    task = asyncio.get_running_loop().create_task(keep_informed(SdNotifier(path), None, 0.02))
    try:
        await asyncio.sleep(0.2)
        assert pending(sock).count(b"WATCHDOG=1") >= 5
        # A blocking call in the loop (a hung libxenctrl call): no task runs, no ping goes.
        time.sleep(0.3)
        assert pending(sock) == []
        await asyncio.sleep(0.3)  # the loop runs again, and so do the pings
        assert pending(sock).count(b"WATCHDOG=1") >= 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert pending(sock) == [], "a cancelled task pings no more"


async def test_no_watchdog_asked_means_no_pings(fake_systemd: tuple[str, socket.socket]) -> None:
    path, sock = fake_systemd
    status = ServiceStatus(SdNotifier(path), lambda: Activity(2, 0, 0))
    task = asyncio.get_running_loop().create_task(keep_informed(SdNotifier(path), status, None))
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert pending(sock) == [b"STATUS=serving; 2 domains; 0 outgoing, 0 incoming migrations"]


def test_status_line_follows_migrations(fake_systemd: tuple[str, socket.socket]) -> None:
    path, sock = fake_systemd
    now = Activity(3, 0, 0)
    status = ServiceStatus(SdNotifier(path), lambda: now)
    assert status.update(READY=1)
    assert received(sock) == {"READY": "1", "STATUS": "serving; 3 domains; 0 outgoing, 0 incoming migrations"}
    now = Activity(3, 1, 0)
    status.observe("migration_started", {"direction": "outgoing"})
    assert received(sock) == {"STATUS": "serving; 3 domains; 1 outgoing, 0 incoming migrations"}
    status.observe("save_finished", {"status": "completed"})  # not a migration: nothing sent
    status.observe("migration_started", {"direction": "outgoing"})  # same line: nothing sent
    assert pending(sock) == []
    now = Activity(1, 0, 0)
    status.observe("migration_finished", {"direction": "outgoing", "status": "completed"})
    assert received(sock) == {"STATUS": "serving; 1 domain; 0 outgoing, 0 incoming migrations"}
    status.phase = "shutting down"
    assert status.update(STOPPING=1)
    assert received(sock) == {"STOPPING": "1", "STATUS": "shutting down; 1 domain; 0 outgoing, 0 incoming migrations"}


def test_status_line_that_cannot_be_computed_is_not_sent(fake_systemd: tuple[str, socket.socket]) -> None:
    path, sock = fake_systemd

    def broken() -> Activity:
        raise RuntimeError("half started")

    assert ServiceStatus(SdNotifier(path), broken).update() is False
    assert pending(sock) == []


def test_reloading_carries_a_monotonic_timestamp(fake_systemd: tuple[str, socket.socket]) -> None:
    path, sock = fake_systemd
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert SdNotifier(path).notify(**reloading_fields())
    fields = received(sock)
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
