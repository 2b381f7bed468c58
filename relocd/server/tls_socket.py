"""ByteTransport over an ``ssl.SSLSocket``: bulk encryption in worker threads, off the event loop.

asyncio's TLS (and uvloop's) encrypts and decrypts inside the event loop's
thread, in 64 KiB reads copied into a StreamReader: one core for every TLS
connection of the daemon, measured at a quarter of a plain connection's page
rate.  Here the socket is wrapped by Python's ``ssl`` module directly and
the transport works like ``SocketTransport``:

* small reads and writes (record headers, control records) go through the
  loop, non-blocking, retried on ``SSLWantRead``/``SSLWantWrite`` when the
  socket is ready; data OpenSSL already decrypted (``pending``) is read
  without waiting;
* bulk transfers (a batch of pages) are one blocking ``recv_into`` /
  ``sendall`` loop in a worker thread: OpenSSL releases the GIL while it
  encrypts, so every page channel of a migration encrypts on its own core,
  and received pages are decrypted straight into guest memory.

An SSL object must not be used from two threads at once, so every SSL call
holds ``_lock``; a read waits for readability *without* it, so a pending read
never blocks a write.  Cancelling a bulk transfer shuts the socket down (the
thread cannot be interrupted), as for plain TCP.

kTLS (the kernel doing the record layer) would need Python 3.12's
``ssl.OP_ENABLE_KTLS`` and the kernel's ``tls`` module; neither is on this
project's machines, so it is not tried.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from relocd.engine.stream import PeerGone
from relocd.server.transport import BULK_BYTES, BULK_TIMEOUT_S, tune_socket, wait_ready

_T = TypeVar("_T")

#: Largest single SSL read or write through the loop (TLS records are 16 KiB).
SMALL_CHUNK = 256 << 10


class TlsSocketTransport:
    """A TLS connection, handshake done, as a ByteTransport."""

    def __init__(self, sslsock: ssl.SSLSocket, *, client: bool, describe: Callable[[ssl.SSLError], str],
                 refused: Callable[[str], PeerGone]) -> None:  # fmt: skip
        self.sock = sslsock
        self.client = client
        self._describe = describe
        self._refused = refused
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._closed = False
        self._received = 0
        self._bulk_work: asyncio.Future[Any] | None = None

    # -- who is there ------------------------------------------------------------------

    @property
    def peer(self) -> str:
        try:
            return str(self.sock.getpeername()[0])
        except OSError:
            return "?"

    @property
    def tls_version(self) -> str | None:
        return self.sock.version()

    def peer_certificate(self) -> dict[str, object] | None:
        cert = self.sock.getpeercert()
        return dict(cert) if cert else None

    def peer_identity(self) -> str | None:
        """The peer certificate's subject and alternative names, as one stable string (see tls.py)."""
        cert = self.peer_certificate()
        if cert is None:
            return None
        subject = cert.get("subject", ())
        parts = [f"{k}={v}" for rdn in subject for (k, v) in rdn]  # type: ignore[attr-defined]
        alt = cert.get("subjectAltName", ())
        parts += [f"{k}:{v}" for (k, v) in alt]  # type: ignore[attr-defined]
        return ",".join(parts) or None

    # -- reading ---------------------------------------------------------------------------

    async def read_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        await self.read_into(memoryview(buf))
        return bytes(buf)

    async def read_into(self, view: memoryview) -> None:
        view = view.cast("B") if view.format != "B" else view
        got = 0
        total = len(view)
        while got < total:
            if total - got >= BULK_BYTES:
                # Mid-record and a megabyte or more to come: one blocking loop in a thread.
                await self._wait_readable()
                async with self._lock:
                    got += await self._bulk(self._blocking_read_into, view[got:])
                continue
            await self._wait_readable()
            async with self._lock:
                try:
                    n = self.sock.recv_into(view[got : got + SMALL_CHUNK])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                except ssl.SSLError as exc:
                    raise self._refused(self._describe(exc)) from None
                except OSError as exc:
                    raise self._lost(f"connection lost: {exc.strerror or exc}") from None
            if n == 0:
                raise self._lost("peer closed the connection")
            got += n
            self._received += n

    def _blocking_read_into(self, view: memoryview) -> int:
        got = 0
        total = len(view)
        try:
            while got < total:
                n = self.sock.recv_into(view[got:], total - got)
                if n == 0:
                    raise self._lost("peer closed the connection")
                got += n
                self._received += n
        except TimeoutError:
            raise PeerGone(f"peer sent nothing for {BULK_TIMEOUT_S:g} s") from None
        except ssl.SSLError as exc:
            raise self._refused(self._describe(exc)) from None
        except OSError as exc:
            raise self._lost(f"connection lost: {exc.strerror or exc}") from None
        return got

    async def _wait_readable(self) -> None:
        if self._closed:
            raise PeerGone("connection closed")
        if self.sock.pending():
            return  # OpenSSL holds decrypted bytes already
        await self._wait_fd(writer=False)

    # -- writing ---------------------------------------------------------------------------

    async def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        if self._closed:
            raise PeerGone("connection closed")
        views = [memoryview(b).cast("B") if isinstance(b, memoryview) else memoryview(b) for b in buffers]
        async with self._lock:
            if sum(len(v) for v in views) >= BULK_BYTES:
                await self._bulk(self._blocking_write, views)
                return
            for v in views:
                sent = 0
                while sent < len(v):
                    try:
                        sent += self.sock.send(v[sent : sent + SMALL_CHUNK])
                    except ssl.SSLWantWriteError:
                        await self._wait_fd(writer=True)
                    except ssl.SSLWantReadError:
                        await self._wait_fd(writer=False)
                    except ssl.SSLError as exc:
                        raise self._refused(self._describe(exc)) from None
                    except OSError as exc:
                        raise self._lost(f"connection lost: {exc.strerror or exc}") from None

    def _blocking_write(self, views: list[memoryview]) -> None:
        # One TLS record per 16 KiB whatever we do; sendall of each guest-memory
        # slice encrypts straight from it (no joined copy of the batch).
        try:
            for v in views:
                self.sock.sendall(v)
        except TimeoutError:
            raise PeerGone(f"peer accepted nothing for {BULK_TIMEOUT_S:g} s") from None
        except ssl.SSLError as exc:
            raise self._refused(self._describe(exc)) from None
        except OSError as exc:
            raise self._lost(f"connection lost: {exc.strerror or exc}") from None

    # -- the machinery -------------------------------------------------------------------

    async def _bulk(self, fn: Callable[[Any], _T], arg: Any) -> _T:
        """A blocking transfer in a worker thread (the caller holds the lock); cancelling closes."""
        if self._closed:
            raise PeerGone("connection closed")
        self.sock.settimeout(BULK_TIMEOUT_S)
        work = asyncio.ensure_future(asyncio.to_thread(fn, arg))
        self._bulk_work = work
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(_swallow)
            self._shutdown()
            raise
        finally:
            if not self._closed:
                self.sock.setblocking(False)

    async def _wait_fd(self, *, writer: bool) -> None:
        await wait_ready(self._loop, self.sock.fileno(), writer=writer)

    def _lost(self, what: str) -> PeerGone:
        if self.client and self._received == 0:
            # TLS 1.3: a server that rejects our certificate does so after our
            # side of the handshake; its alert rarely beats the close.
            return self._refused(
                f"TLS: {what} right after the handshake "
                "(does the peer require a client certificate from a CA that did not sign ours?)"
            )
        return PeerGone(what)

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        bulk = self._bulk_work
        self._shutdown()  # no close_notify: the peer's reads end either way
        if bulk is not None and not bulk.done():
            await asyncio.wait({bulk}, timeout=5)  # let the thread leave the fd first
        self.sock.close()


async def handshake(sock: socket.socket, ctx: ssl.SSLContext, *, server_hostname: str | None,
                    timeout: float) -> ssl.SSLSocket:  # fmt: skip
    """Wrap a connected socket and run the TLS handshake through the loop; raises OSError/TimeoutError."""
    tune_socket(sock)  # non-blocking, big buffers, no Nagle
    sslsock = ctx.wrap_socket(
        sock, server_side=server_hostname is None, server_hostname=server_hostname, do_handshake_on_connect=False
    )
    loop = asyncio.get_running_loop()
    fd = sslsock.fileno()
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    sslsock.do_handshake()
                    return sslsock
                except ssl.SSLWantReadError:
                    await wait_ready(loop, fd, writer=False)
                except ssl.SSLWantWriteError:
                    await wait_ready(loop, fd, writer=True)
    except BaseException:
        _hang_up(sslsock)
        raise


def _hang_up(sslsock: ssl.SSLSocket) -> None:
    """Close after a failed handshake: the alert OpenSSL wrote goes out, then a FIN, not a reset.

    What the peer sent and we did not read would make the close a reset
    (and could destroy the alert on its way): read it away first.
    """
    raw = socket.socket(sslsock.family, sslsock.type, fileno=os.dup(sslsock.fileno()))
    try:
        raw.setblocking(False)
        raw.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not raw.recv(65536):
                break
    except OSError:
        pass
    finally:
        raw.close()
        sslsock.close()


def _swallow(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
