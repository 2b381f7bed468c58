"""A process per domain, and how the daemon talks to it.

Drivers that run each domain in its own OS process (``sim``, ``kvm``'s
micro-VMM) share this plumbing, which knows nothing about hypervisors:

* ``spawn`` starts the process in its own session (killing or restarting the
  daemon never kills a domain) and waits until its control socket is ready
  (``start`` and ``wait_serving`` are its halves, for a caller that lets the
  process come up in the background);
* the control socket speaks JSON lines, one request and one reply at a time,
  and a reply may carry file descriptors (``SCM_RIGHTS``), which is how guest
  memory (a memfd) reaches the daemon without a copy;
* ``ControlServer`` is the domain-process side, ``DomainProcessClient`` the
  daemon side (blocking, with timeouts; ``acall`` runs it off the event loop);
* ``stop_process`` ends a domain process it can prove is the right one.

A request is ``{"op": NAME, ...}``; a reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from relocd.errors import DriverError

log = logging.getLogger(__name__)

Message = dict[str, Any]
Reply = tuple[Message, list[int]]
#: Domain-process request handler: (request, fds that came with it) -> (reply, fds to send).
Handler = Callable[[Message, list[int]], Reply]

MAX_MESSAGE = 1 << 20
MAX_FDS = 8
_RECV_CHUNK = 65536
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes; stay clear of the edge


class RequestFailed(Exception):
    """Raised by a handler in the domain process: answered as ``{"ok": false, "error": message}``."""


class ConnectionLost(OSError):
    """The other end closed the control connection."""


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A path for bind/connect that fits in sun_path, via /proc/self/fd when the real one is long."""
    text = str(path)
    if len(os.fsencode(text)) < _SUN_PATH_MAX:
        yield text
        return
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dir_fd}/{path.name}"
    finally:
        os.close(dir_fd)


def send_message(sock: socket.socket, message: Message, fds: Sequence[int] = ()) -> None:
    """Send one JSON line; ``fds`` ride with its first byte (they are not closed here)."""
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


class MessageReader:
    """Reads JSON lines and the descriptors that arrived with them from one stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []

    def read(self) -> tuple[Message, list[int]]:
        """The next message and every fd received since the previous one; ConnectionLost on EOF."""
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_MESSAGE:
                raise DriverError(f"control message longer than {MAX_MESSAGE} bytes")
            data, fds, flags, _ = socket.recv_fds(self._sock, _RECV_CHUNK, MAX_FDS)
            self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                self.discard_fds()
                raise DriverError("control message carried too many file descriptors")
            if not data:
                self.discard_fds()
                raise ConnectionLost(errno.ECONNRESET, "control connection closed")
            self._buf += data
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        fds, self._fds = self._fds, []
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            for fd in fds:
                os.close(fd)
            raise DriverError("malformed control message")
        return message, fds

    def discard_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


# --------------------------------------------------------------------- domain-process side


class ControlServer:
    """The control socket of a domain process: a thread per connection, one handler for all.

    The socket is bound under a temporary name and renamed into place once it
    listens, so the socket file existing means the process is ready.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with _addressable(tmp) as addr:
            self._listener.bind(addr)
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        os.replace(tmp, path)

    def serve_until(self, stop: threading.Event) -> None:
        """Accept connections until ``stop`` is set; then close the listener and remove the socket."""
        try:
            while not stop.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()
        finally:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _serve_connection(self, conn: socket.socket) -> None:
        reader = MessageReader(conn)
        with conn:
            while True:
                try:
                    request, fds = reader.read()
                except (OSError, DriverError):
                    return  # the daemon went away (or spoke nonsense): wait for the next one
                reply, reply_fds = self._dispatch(request, fds)
                try:
                    send_message(conn, reply, reply_fds)
                except OSError:
                    return

    def _dispatch(self, request: Message, fds: list[int]) -> Reply:
        try:
            reply, reply_fds = self._handler(request, fds)
        except RequestFailed as exc:
            return {"ok": False, "error": str(exc)}, []
        except Exception as exc:  # a bug here must not kill the domain
            log.exception("request %r failed", request.get("op"))
            return {"ok": False, "error": f"internal error in domain process: {type(exc).__name__}: {exc}"}, []
        return {"ok": True, **reply}, reply_fds


# --------------------------------------------------------------------- daemon side


class DomainProcessClient:
    """The daemon's connection to one domain process; thread-safe, reconnects on demand.

    A request that was sent but not answered is never repeated (it may have
    taken effect: a dirty-log fetch-and-clear, say); only a send that failed
    because the old connection was already dead is retried, once, on a new one.
    """

    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: MessageReader | None = None

    def connect(self) -> None:
        with self._lock:
            self._connect()

    def _connect(self) -> None:
        self._disconnect()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            with _addressable(self.socket_path) as addr:
                sock.connect(addr)
        except OSError as exc:
            sock.close()
            raise DriverError(f"cannot reach domain process at {self.socket_path}: {exc.strerror or exc}") from None
        self._sock, self._reader = sock, MessageReader(sock)

    def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.discard_fds()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def call(self, op: str, *, timeout: float | None = None, **args: Any) -> Reply:
        """Send one request and wait for its reply; DriverError if it fails or nobody answers.

        The caller owns (and must close) the fds in the reply.
        """
        request = {"op": op, **args}
        with self._lock:
            self._send(request)
            assert self._sock is not None and self._reader is not None
            self._sock.settimeout(timeout if timeout is not None else self.timeout)
            try:
                reply, fds = self._reader.read()
            except TimeoutError:
                self._disconnect()  # a late reply would answer the next request
                raise DriverError(f"domain process did not answer {op!r} in time") from None
            except (OSError, DriverError) as exc:
                self._disconnect()
                raise DriverError(f"lost domain process during {op!r}: {exc}") from None
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise DriverError(str(reply.get("error") or f"{op} failed"))
        return reply, fds

    def _send(self, request: Message) -> None:
        for attempt in (1, 2):
            if self._sock is None:
                self._connect()
            assert self._sock is not None
            try:
                self._sock.settimeout(self.timeout)
                send_message(self._sock, request)
                return
            except (BrokenPipeError, ConnectionResetError, ConnectionLost):
                self._disconnect()
                if attempt == 2:
                    raise DriverError(f"domain process at {self.socket_path} hung up") from None
            except OSError as exc:
                self._disconnect()
                raise DriverError(f"cannot talk to domain process: {exc}") from None

    async def acall(self, op: str, *, timeout: float | None = None, **args: Any) -> Reply:
        """``call`` in a worker thread, so the event loop never blocks on a domain process."""
        import asyncio  # here: domain processes import this module and never need asyncio

        return await asyncio.to_thread(self.call, op, timeout=timeout, **args)


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a domain process's log, for an error message."""
    try:
        text = path.read_bytes()[-4096:].decode(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail)[-400:]


def start(
    argv: Sequence[str],
    *,
    socket_path: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start a domain process in its own session (``pass_fds`` stay open in it); does not wait."""
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            cwd="/",
            env=None if env is None else dict(env),
        )


def wait_serving(popen: subprocess.Popen[bytes], *, socket_path: Path, log_path: Path, timeout: float) -> None:
    """Wait until a started domain process's control socket exists; DriverError (and kill) if it never does."""
    deadline = time.monotonic() + timeout
    while not socket_path.exists():
        status = popen.poll()
        if status is not None:
            detail = log_tail(log_path)
            raise DriverError(f"domain process exited with status {status}" + (f": {detail}" if detail else ""))
        if time.monotonic() > deadline:
            popen.kill()
            popen.wait()
            raise DriverError(f"domain process did not come up within {timeout:.0f}s")
        time.sleep(0.01)


def spawn(
    argv: Sequence[str],
    *,
    socket_path: Path,
    log_path: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a domain process in its own session and wait until its control socket exists."""
    popen = start(argv, socket_path=socket_path, log_path=log_path, env=env)
    wait_serving(popen, socket_path=socket_path, log_path=log_path, timeout=timeout)
    return popen


def process_alive(pid: int, marker: str) -> bool:
    """True if ``pid`` is a live (not zombie) process whose command line contains ``marker``.

    The marker (a domain uuid) guards against a recycled pid.
    """
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X") and marker.encode() in cmdline


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (no zombie left behind)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(pid: int, *, marker: str, popen: subprocess.Popen[bytes] | None = None, grace: float = 5.0) -> None:
    """Wait up to ``grace`` seconds for a domain process to exit, then SIGKILL it."""
    deadline = time.monotonic() + grace
    while process_alive(pid, marker) and time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            break
        time.sleep(0.01)
    if process_alive(pid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        kill_deadline = time.monotonic() + 5.0
        while process_alive(pid, marker) and time.monotonic() < kill_deadline:
            if popen is not None and popen.poll() is not None:
                break
            time.sleep(0.01)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=1.0)
    else:
        _reap(pid)
