"""Baseline for the migration benchmarks: move the same bytes over loopback TCP, plainly.

The sender sends a 1 GiB (or N-byte) buffer with blocking ``sendall`` in 4 MiB
pieces; the receiver ``recv_into``s a buffer of the same size, each in its own
process, like two daemons.  Both buffers are touched first so neither side
pays first-touch page faults (a migration target's memory is set aside at
reservation time, before the stream starts).  This is the ceiling a
migration's streaming phase is measured against; the ratio is what we report.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import socket
import time

CHUNK = 4 << 20


def touched_buffer(nbytes: int, fill: int = 0) -> memoryview:
    buf = mmap.mmap(-1, nbytes)
    page = bytes([fill]) * mmap.PAGESIZE
    for off in range(0, nbytes, mmap.PAGESIZE):
        buf[off : off + mmap.PAGESIZE] = page
    return memoryview(buf)


def _receiver(port_q: "mp.Queue[int]", total: int, address: str) -> None:
    buf = touched_buffer(total)
    srv = socket.socket()
    srv.bind((address, 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    got = 0
    while got < total:
        n = conn.recv_into(buf[got : got + CHUNK])
        if n == 0:
            break
        got += n
    conn.sendall(b"k")


def raw_loopback_transfer(total: int, address: str = "127.0.0.2") -> float:
    """Seconds to move `total` bytes from one process's memory to another's over loopback TCP."""
    ctx = mp.get_context("fork")
    port_q: mp.Queue[int] = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(port_q, total, address))
    proc.start()
    payload = touched_buffer(total, 0xA5)
    port = port_q.get()
    sock = socket.create_connection((address, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    t0 = time.monotonic()
    for off in range(0, total, CHUNK):
        sock.sendall(payload[off : off + CHUNK])
    sock.recv(1)
    t1 = time.monotonic()
    sock.close()
    proc.join()
    payload.release()
    return t1 - t0


if __name__ == "__main__":
    total = 1 << 30
    for _ in range(3):
        dt = raw_loopback_transfer(total)
        print(f"raw loopback TCP: {total / dt / 1e9:.2f} GB/s ({dt:.2f} s for 1 GiB)")
