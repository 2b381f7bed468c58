"""The control socket: how the `relocd` command talks to the local daemon.

A unix stream socket carrying JSON lines (UTF-8), one operation per
connection.  The client sends one request line::

    {"op": "migrate", "args": {...}}

and the server answers with zero or more event lines, then exactly one final
line::

    {"event": "progress", ...}
    {"ok": true, "result": ...}
    {"ok": false, "error": "one line", "exit": 1}

``exit`` is the status the command should exit with: 1 for a failed
operation, 2 for bad usage (unknown op, bad arguments, bad config).

The server is a registry: the daemon hands it a mapping of op name to handler.
An operation runs in its own task, so a client that goes away (a closed
terminal, Ctrl-C on `relocd migrate`) never cancels it; its progress events
are simply dropped.  Progress is lossy by design: an event is dropped rather
than queued when the client is not reading, so a suspended terminal cannot
stall a migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from relocd.errors import ConfigError, RelocdError

log = structlog.get_logger(__name__)

#: Longest request line the server reads; anything longer is refused.
MAX_REQUEST_BYTES = 1 << 20
#: Longest line the client accepts (a `list` of many domains is still small).
MAX_REPLY_BYTES = 64 << 20
#: Progress events are dropped while this much is waiting to reach the client.
MAX_PENDING_EVENT_BYTES = 256 << 10
#: How long the final reply may wait for a slow client before it is dropped.
FINAL_REPLY_TIMEOUT_S = 30.0
#: How long a client may take to send its request line.
REQUEST_TIMEOUT_S = 30.0

EXIT_FAILED = 1
EXIT_USAGE = 2


class ProgressSink(Protocol):
    """Where a handler reports progress; the control server forwards it."""

    async def emit(self, **fields: Any) -> None: ...


Handler = Callable[[dict[str, Any], ProgressSink], Awaitable[Any]]


class BadRequest(RelocdError):
    """The request itself is wrong (unknown op, missing or bad argument): exit 2."""

    exit = EXIT_USAGE


class DaemonError(RelocdError):
    """The daemon answered ``{"ok": false}``; ``exit`` is the status to exit with."""

    def __init__(self, message: str, exit: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit = exit


class DaemonUnreachable(RelocdError):
    """No daemon listens on the control socket (or we may not talk to it)."""

    exit = EXIT_FAILED


class NullSink:
    """A sink that drops everything (an operation nobody watches)."""

    async def emit(self, **fields: Any) -> None:
        return None


def one_line(text: str, limit: int = 500) -> str:
    """Squash a message onto one line an operator can read."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def exit_status_for(exc: RelocdError) -> int:
    """Exit status a RelocdError maps to: 2 for usage and config errors, else 1."""
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    status = getattr(exc, "exit", EXIT_FAILED)
    return status if isinstance(status, int) and status in (1, 2) else EXIT_FAILED


def _to_json(value: Any) -> Any:
    """json.dumps fallback for the types handlers naturally return."""
    if hasattr(value, "model_dump"):  # pydantic models
        return value.model_dump(mode="json")
    if hasattr(value, "to_json") and callable(value.to_json):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_line(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, default=_to_json, separators=(",", ":")) + "\n").encode()


def _peer_credentials(writer: asyncio.StreamWriter) -> dict[str, int]:
    """pid/uid of the client, for the log (Linux SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or peercred is None:
        return {}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i"))
    except OSError:
        return {}
    pid, uid, _gid = struct.unpack("3i", raw)
    return {"peer_pid": pid, "peer_uid": uid}


class _ClientSink:
    """Forwards progress events to one client, dropping them once it is gone."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.dropped = 0

    @property
    def connected(self) -> bool:
        return not self._writer.is_closing()

    async def emit(self, **fields: Any) -> None:
        if not self.connected:
            self.dropped += 1
            return
        transport = self._writer.transport
        if transport.get_write_buffer_size() > MAX_PENDING_EVENT_BYTES:
            self.dropped += 1  # the client is not reading: never block the operation
            return
        try:
            self._writer.write(encode_line({"event": "progress", **fields}))
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            self.dropped += 1
            log.debug("progress event dropped", error=str(exc))


class ControlServer:
    """Serves the operator API on a unix socket; ops are looked up in ``handlers``."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._operations: set[asyncio.Task[Any]] = set()
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    @property
    def in_flight(self) -> int:
        """Operations still running (their clients may be long gone)."""
        return len(self._operations)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind the socket (0600), replacing a stale one; refuse if a daemon owns it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._clear_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(
                self._serve_connection, sock=sock, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            sock.close()
            raise RelocdError(
                f"cannot listen on control socket {self.path}: {exc.strerror or exc}"
            ) from exc
        log.info("control socket listening", path=str(self.path))

    async def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RelocdError(f"{self.path} exists and is not a socket; not replacing it")
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path)), timeout=2.0
            )
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket", path=str(self.path))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except (OSError, asyncio.TimeoutError) as exc:
            raise RelocdError(f"cannot check control socket {self.path}: {exc}") from exc
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise RelocdError(f"another relocd is already listening on {self.path}")

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop listening, give running operations ``grace_s`` to end, cancel the rest."""
        if self._server is not None:
            self._server.close()
            self._remove_socket_file()
        if self._operations and grace_s > 0:
            await asyncio.wait(set(self._operations), timeout=grace_s)
        for task in list(self._operations):
            task.cancel()
        if self._operations:
            await asyncio.gather(*self._operations, return_exceptions=True)
        if self._connections:  # let them tell their clients what happened
            await asyncio.wait(set(self._connections), timeout=1.0)
        for task, writer in list(self._connections.items()):
            writer.close()
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(OSError):
                await self._server.wait_closed()
            self._server = None

    def _remove_socket_file(self) -> None:
        """Unlink the socket file, unless someone else has replaced it since."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if self._inode == (st.st_dev, st.st_ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._connections[me] = writer
        try:
            reply = await self._answer(reader, writer)
            if not writer.is_closing():
                writer.write(encode_line(reply))
                await asyncio.wait_for(writer.drain(), timeout=FINAL_REPLY_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            pass  # the client left; the operation (if any) has already finished
        finally:
            if me is not None:
                self._connections.pop(me, None)
            writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        """Read one request, run it, and build the final reply line."""
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            return _failure("no request received", EXIT_USAGE)
        except asyncio.LimitOverrunError:
            return _failure(f"request longer than {MAX_REQUEST_BYTES} bytes", EXIT_USAGE)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return _failure("empty request", EXIT_USAGE)
            line = exc.partial
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _failure(f"malformed request: {exc}", EXIT_USAGE)
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return _failure('malformed request: expected {"op": NAME, "args": {...}}', EXIT_USAGE)
        op: str = request["op"]
        args = request.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return _failure("malformed request: args must be an object", EXIT_USAGE)
        handler = self.handlers.get(op)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return _failure(f"unknown operation {op!r} (known: {known})", EXIT_USAGE)

        sink = _ClientSink(writer)
        bound = structlog.get_logger(__name__).bind(op=op, **_peer_credentials(writer))
        bound.info("control request")
        # Its own task: a client that disconnects cancels nothing.
        async def operation() -> Any:
            return await handler(args, sink)

        task = asyncio.create_task(operation(), name=f"control-{op}")
        self._operations.add(task)
        task.add_done_callback(self._operations.discard)
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                return _failure(f"operation {op} was cancelled", EXIT_FAILED)
            raise
        except RelocdError as exc:
            status = exit_status_for(exc)
            bound.info("control request failed", error=exc.message, exit=status)
            return _failure(exc.message, status)
        except Exception as exc:
            bound.exception("control request crashed")
            return _failure(f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILED)
        if sink.dropped:
            bound.info("progress events dropped", count=sink.dropped)
        reply = {"ok": True, "result": result}
        try:
            encode_line(reply)
        except (TypeError, ValueError) as exc:
            bound.exception("control result not serializable")
            return _failure(f"internal error: {exc}", EXIT_FAILED)
        return reply


def _failure(message: str, status: int) -> dict[str, Any]:
    return {"ok": False, "error": one_line(message), "exit": status}


# --- the client half ------------------------------------------------------

EventCallback = Callable[[dict[str, Any]], None]


class ControlClient:
    """Talks to the daemon at ``path``; one connection per call."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    async def call(
        self, op: str, args: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
    ) -> Any:
        """Run ``op`` and return its result; raise DaemonError on ``{"ok": false}``."""
        reader, writer = await self._connect()
        try:
            writer.write(encode_line({"op": op, "args": args or {}}))
            await writer.drain()
            while True:
                message = await self._read_message(reader)
                if "event" in message:
                    if on_event is not None:
                        on_event(message)
                    continue
                return self._final(message)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise self._lost() from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        where = f"cannot reach relocd at {self.path}"
        try:
            return await asyncio.open_unix_connection(str(self.path), limit=MAX_REPLY_BYTES)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(
                f"{where}: is the daemon running? (relocd serve)"
            ) from exc
        except PermissionError as exc:
            raise DaemonUnreachable(f"{where}: permission denied (try as root)") from exc
        except OSError as exc:
            raise DaemonUnreachable(f"{where}: {exc.strerror or exc}") from exc

    async def _read_message(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            raise self._lost() from exc
        except asyncio.LimitOverrunError as exc:
            raise RelocdError(f"reply from relocd at {self.path} is too long") from exc
        try:
            message = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RelocdError(f"garbled reply from relocd at {self.path}") from exc
        if not isinstance(message, dict):
            raise RelocdError(f"garbled reply from relocd at {self.path}")
        return message

    def _final(self, message: dict[str, Any]) -> Any:
        if message.get("ok") is True:
            return message.get("result")
        status = message.get("exit", EXIT_FAILED)
        if status not in (EXIT_FAILED, EXIT_USAGE):
            status = EXIT_FAILED
        raise DaemonError(one_line(str(message.get("error") or "operation failed")), status)

    def _lost(self) -> RelocdError:
        return RelocdError(
            f"relocd at {self.path} closed the connection without answering "
            "(see the daemon's log)"
        )


async def call(
    path: Path, op: str, args: dict[str, Any] | None = None,
    on_event: EventCallback | None = None,
) -> Any:
    """Shorthand for ``ControlClient(path).call(op, args, on_event)``."""
    return await ControlClient(path).call(op, args, on_event)
