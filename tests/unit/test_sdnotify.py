"""sd_notify against a fake systemd: a datagram socket we bind ourselves."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relocd.server import sdnotify
from relocd.server.sdnotify import SdNotifier, format_fields, watchdog_interval_s


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
