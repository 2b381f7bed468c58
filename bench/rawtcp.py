"""Baseline for the migration benchmarks: move N bytes over loopback TCP, plainly.

Sender: sendall of one reused 4 MiB buffer; receiver: recv_into one reused
4 MiB buffer.  Both in their own process, like two daemons.  This is the
ceiling a migration is measured against (the ratio is what we report).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time

CHUNK = 4 << 20


def _receiver(port_q: "mp.Queue[int]", total: int, done_q: "mp.Queue[float]", address: str) -> None:
    srv = socket.socket()
    srv.bind((address, 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    buf = memoryview(bytearray(CHUNK))
    got = 0
    while got < total:
        n = conn.recv_into(buf, min(CHUNK, total - got))
        if n == 0:
            break
        got += n
    conn.sendall(b"k")
    done_q.put(time.monotonic())


def raw_loopback_transfer(total: int, address: str = "127.0.0.2") -> float:
    """Seconds to move `total` bytes from one process to another over loopback TCP."""
    ctx = mp.get_context("fork")
    port_q: mp.Queue[int] = ctx.Queue()
    done_q: mp.Queue[float] = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(port_q, total, done_q, address))
    proc.start()
    port = port_q.get()
    payload = memoryview(bytearray(b"\xa5" * CHUNK))
    sock = socket.create_connection((address, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    t0 = time.monotonic()
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        sock.sendall(payload[:n])
        sent += n
    sock.recv(1)
    t1 = time.monotonic()
    sock.close()
    proc.join()
    return t1 - t0


if __name__ == "__main__":
    total = 1 << 30
    dt = raw_loopback_transfer(total)
    print(f"raw loopback TCP: {total / dt / 1e9:.2f} GB/s ({dt:.2f} s for 1 GiB)")
