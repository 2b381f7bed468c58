"""The xen driver's save pump: libxenguest's stream leaves the pipe in chunks of up to 1 MiB."""

from __future__ import annotations

import os
import threading
import time

from relocd.drivers.xen.stream import CHUNK, _Pump, widen_pipe


def test_the_pump_reads_whole_chunks_from_a_widened_pipe() -> None:
    rfd, wfd = os.pipe()
    widen_pipe(wfd)
    sizes: list[int] = []

    def sink(chunk: bytes) -> None:
        sizes.append(len(chunk))
        if len(sizes) == 1:
            time.sleep(0.2)  # a slow transport: the writer fills the pipe meanwhile

    pump = _Pump(rfd, sink)
    pump.thread.start()
    data = os.urandom(4 * CHUNK)  # one libxenguest batch

    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(wfd, view) :]
        os.close(wfd)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join(10)
    pump.thread.join(10)
    assert pump.error is None and sum(sizes) == len(data) == pump.nbytes
    # Linux's default pipe holds 64 KiB: every read would be at most that.
    assert max(sizes) == CHUNK, sizes
