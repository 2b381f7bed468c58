"""The control socket: a real server on a temporary unix socket, fake handlers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from relocd.errors import ConfigError, DomainNotFound, RelocdError
from relocd.server import control
from relocd.server.control import (
    BadRequest,
    ControlServer,
    DaemonError,
    DaemonUnreachable,
    ProgressSink,
    call,
)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # tmp_path can exceed the 108-byte limit of a unix socket path.
    d = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def echo(args: dict[str, Any], sink: ProgressSink) -> Any:
    for i in range(3):
        await sink.emit(round=i + 1, pages_left=100 - i)
    return {"echo": args}


async def fails(args: dict[str, Any], sink: ProgressSink) -> Any:
    raise DomainNotFound("no domain named 'ghost'")


async def bad_config(args: dict[str, Any], sink: ProgressSink) -> Any:
    raise ConfigError("argument memory: expected int")


async def bad_request(args: dict[str, Any], sink: ProgressSink) -> Any:
    raise BadRequest("missing argument: name")


async def crashes(args: dict[str, Any], sink: ProgressSink) -> Any:
    raise ZeroDivisionError("secret\ninternals")


async def unserializable(args: dict[str, Any], sink: ProgressSink) -> Any:
    return {"x": object()}


async def returns_path(args: dict[str, Any], sink: ProgressSink) -> Any:
    return {"file": Path("/var/lib/relocd/x.sav"), "sizes": (1, 2)}


HANDLERS = {
    "echo": echo,
    "fails": fails,
    "bad_config": bad_config,
    "bad_request": bad_request,
    "crashes": crashes,
    "unserializable": unserializable,
    "returns_path": returns_path,
}


@pytest.fixture
async def server(sock_dir: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(sock_dir / "run" / "control.sock", HANDLERS)
    await srv.start()
    yield srv
    await srv.close()


async def raw_exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    """Send raw bytes, return every line the server answers with."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(payload)
        await writer.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = await reader.read()
    writer.close()
    return [json.loads(line) for line in data.decode().splitlines()]


async def test_result_and_progress_events(server: ControlServer) -> None:
    events: list[dict[str, Any]] = []
    result = await call(server.path, "echo", {"a": 1}, events.append)
    assert result == {"echo": {"a": 1}}
    assert [e["round"] for e in events] == [1, 2, 3]
    assert all(e["event"] == "progress" for e in events)


async def test_socket_is_private_and_parent_created(server: ControlServer) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_wire_format_is_json_lines(server: ControlServer) -> None:
    lines = await raw_exchange(server.path, b'{"op": "echo", "args": {"k": "v"}}\n')
    assert lines[-1] == {"ok": True, "result": {"echo": {"k": "v"}}}
    assert len(lines) == 4


async def test_operation_error_is_exit_1(server: ControlServer) -> None:
    with pytest.raises(DaemonError) as info:
        await call(server.path, "fails", {})
    assert info.value.exit == 1
    assert info.value.message == "no domain named 'ghost'"


@pytest.mark.parametrize("op", ["bad_config", "bad_request"])
async def test_usage_errors_are_exit_2(server: ControlServer, op: str) -> None:
    with pytest.raises(DaemonError) as info:
        await call(server.path, op, {})
    assert info.value.exit == 2


async def test_unknown_op_is_exit_2_and_lists_known(server: ControlServer) -> None:
    with pytest.raises(DaemonError) as info:
        await call(server.path, "frobnicate", {})
    assert info.value.exit == 2
    assert "frobnicate" in info.value.message and "echo" in info.value.message


async def test_internal_error_is_one_line_and_logged(server: ControlServer) -> None:
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(DaemonError) as info:
            await call(server.path, "crashes", {})
    assert info.value.exit == 1
    assert info.value.message == "internal error: ZeroDivisionError: secret internals"
    assert "Traceback" not in info.value.message
    crashed = [e for e in logs if e["event"] == "control request crashed"]
    assert crashed and crashed[0]["exc_info"] is True and crashed[0]["op"] == "crashes"


async def test_unserializable_result_is_internal_error(server: ControlServer) -> None:
    with structlog.testing.capture_logs():
        with pytest.raises(DaemonError, match="internal error"):
            await call(server.path, "unserializable", {})


async def test_paths_and_tuples_serialize(server: ControlServer) -> None:
    assert await call(server.path, "returns_path", {}) == {
        "file": "/var/lib/relocd/x.sav", "sizes": [1, 2]}


@pytest.mark.parametrize(
    "payload",
    [b"{nope\n", b"[1, 2]\n", b'{"args": {}}\n', b'{"op": "echo", "args": [1]}\n',
     b"\xff\xfe\n", b"\n"],
)
async def test_malformed_request_gets_error_and_server_goes_on(
    server: ControlServer, payload: bytes
) -> None:
    lines = await raw_exchange(server.path, payload)
    assert len(lines) == 1
    assert lines[0]["ok"] is False and lines[0]["exit"] == 2
    assert "\n" not in lines[0]["error"]
    assert await call(server.path, "echo", {}) == {"echo": {}}


async def test_request_without_newline_then_eof_is_accepted(server: ControlServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(b'{"op": "echo"}')
    writer.write_eof()
    lines = [json.loads(x) for x in (await reader.read()).decode().splitlines()]
    writer.close()
    assert lines[-1] == {"ok": True, "result": {"echo": {}}}


async def test_oversized_request_refused(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_REQUEST_BYTES", 4096)
    async with ControlServer(sock_dir / "c.sock", HANDLERS) as srv:
        big = b'{"op": "echo", "args": {"x": "' + b"a" * 10_000 + b'"}}\n'
        lines = await raw_exchange(srv.path, big)
        assert lines[0]["ok"] is False and lines[0]["exit"] == 2
        assert "longer than 4096" in lines[0]["error"]
        assert await call(srv.path, "echo", {"small": True}) == {"echo": {"small": True}}


async def test_client_disconnect_does_not_cancel_operation(sock_dir: Path) -> None:
    started, go_on, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    async def long_migration(args: dict[str, Any], sink: ProgressSink) -> Any:
        try:
            await sink.emit(phase="precopy")
            started.set()
            await go_on.wait()
            for i in range(50):  # the client is gone: these must be dropped quietly
                await sink.emit(round=i)
            outcome.append("completed")
            return {"status": "completed"}
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        finally:
            finished.set()

    async with ControlServer(sock_dir / "c.sock", {"migrate": long_migration}) as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        writer.write(b'{"op": "migrate", "args": {}}\n')
        first = json.loads(await reader.readline())
        assert first["phase"] == "precopy"
        await started.wait()
        writer.close()  # the operator closed the terminal
        await writer.wait_closed()
        await asyncio.sleep(0.05)
        go_on.set()
        await asyncio.wait_for(finished.wait(), 5)
        assert outcome == ["completed"]
        assert srv.in_flight == 0


async def test_client_that_does_not_read_cannot_stall_operation(sock_dir: Path) -> None:
    big = "x" * 64 * 1024

    finished = asyncio.Event()

    async def chatty(args: dict[str, Any], sink: ProgressSink) -> Any:
        for i in range(200):  # ~13 MB of events: far beyond any socket buffer
            await sink.emit(round=i, blob=big)
        finished.set()
        return "done"

    async with ControlServer(sock_dir / "c.sock", {"chatty": chatty}) as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path), limit=1 << 24)
        writer.write(b'{"op": "chatty"}\n')
        # a suspended `relocd migrate`: nobody reads, yet the operation ends
        await asyncio.wait_for(finished.wait(), 5)
        lines = (await reader.read()).decode().splitlines()
        writer.close()
        assert json.loads(lines[-1]) == {"ok": True, "result": "done"}
        assert len(lines) < 201  # some events were dropped, none half-written
        assert all(json.loads(line) for line in lines)


async def test_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "c.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a crashed daemon's leftover: bound, nobody listening
    dead.close()
    assert path.exists()
    async with ControlServer(path, HANDLERS) as srv:
        assert await call(srv.path, "echo", {}) == {"echo": {}}
    assert not path.exists()


async def test_live_socket_is_not_taken_over(server: ControlServer) -> None:
    second = ControlServer(server.path, HANDLERS)
    with pytest.raises(RelocdError, match="already listening"):
        await second.start()
    assert await call(server.path, "echo", {}) == {"echo": {}}


async def test_regular_file_is_not_removed(sock_dir: Path) -> None:
    path = sock_dir / "c.sock"
    path.write_text("operator's notes")
    with pytest.raises(RelocdError, match="not a socket"):
        await ControlServer(path, HANDLERS).start()
    assert path.read_text() == "operator's notes"


async def test_close_removes_only_its_own_socket(sock_dir: Path) -> None:
    path = sock_dir / "c.sock"
    srv = ControlServer(path, HANDLERS)
    await srv.start()
    path.unlink()
    path.write_text("someone else's")
    await srv.close()
    assert path.read_text() == "someone else's"


async def test_close_cancels_after_grace_and_tells_client(sock_dir: Path) -> None:
    async def forever(args: dict[str, Any], sink: ProgressSink) -> Any:
        await asyncio.sleep(3600)

    srv = ControlServer(sock_dir / "c.sock", {"forever": forever})
    await srv.start()
    pending = asyncio.create_task(call(srv.path, "forever", {}))
    while srv.in_flight == 0:
        await asyncio.sleep(0.01)
    await srv.close(grace_s=0.05)
    with pytest.raises(DaemonError, match="cancelled"):
        await asyncio.wait_for(pending, 5)


async def test_unreachable_daemon_message(sock_dir: Path) -> None:
    path = sock_dir / "nobody.sock"
    with pytest.raises(DaemonUnreachable) as info:
        await call(path, "list", {})
    assert info.value.message == (
        f"cannot reach relocd at {path}: is the daemon running? (relocd serve)"
    )


async def test_daemon_hanging_up_is_a_clear_error(sock_dir: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"event": "progress", "round": 1}\n')
        writer.close()

    path = sock_dir / "c.sock"
    srv = await asyncio.start_unix_server(hang_up, str(path))
    try:
        with pytest.raises(RelocdError, match="closed the connection without answering"):
            await call(path, "list", {})
    finally:
        srv.close()


# --- what lands in the daemon's log (relocd.logs) ---------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    from relocd.logs import configure_logging

    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    yield buf
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == "relocd":
            root.removeHandler(handler)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


async def test_daemon_log_gets_traceback_and_context(
    sock_dir: Path, json_log: io.StringIO
) -> None:
    async def crash_in_migration(args: dict[str, Any], sink: ProgressSink) -> Any:
        structlog.contextvars.bind_contextvars(migration_id="m-42")
        logging.getLogger("some.library").warning("stdlib line")
        raise ZeroDivisionError("boom")

    async with ControlServer(sock_dir / "c.sock", {"migrate": crash_in_migration}) as srv:
        with pytest.raises(DaemonError, match="internal error"):
            await call(srv.path, "migrate", {})
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    by_event = {line["event"]: line for line in lines}
    assert by_event["stdlib line"]["migration_id"] == "m-42"
    assert by_event["stdlib line"]["logger"] == "some.library"
    crashed = by_event["control request crashed"]
    assert crashed["level"] == "error" and crashed["op"] == "migrate"
    assert "Traceback" in crashed["exception"] and "ZeroDivisionError: boom" in crashed["exception"]
    assert all("timestamp" in line for line in lines)


def test_log_format_auto_and_errors() -> None:
    from relocd.logs import _resolve_format, configure_logging

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert _resolve_format("auto", io.StringIO()) == "json"  # journald
    assert _resolve_format("auto", Tty()) == "console"
    with pytest.raises(ValueError):
        configure_logging("xml")
    with pytest.raises(ValueError):
        configure_logging("json", "chatty")
