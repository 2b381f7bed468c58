"""Save and restore throughput against a plain sequential copy, and the checkpoint pause.

Not a test: run ``python bench/bench_save.py [--memory-mib 1024] [--dir DIR]``
by hand.  In one run, on the same file system:

* plain write: guest memory to a file, 8 MiB ``os.write`` calls, then fsync;
* ``save``: the same domain through ``save_domain`` (header, records, digest,
  fsync, rename); ratio = plain time / save time (target >= 0.8);
* plain read: the file back into memory, 8 MiB ``readinto`` calls;
* ``restore``: ``restore_savefile`` (digest pass, reservation, replay);
  ratio = plain time / restore time (target >= 0.8), measured with the file
  in the page cache (warm) and, when ``posix_fadvise`` can evict it, cold;
* ``save --checkpoint`` of a domain running ``hotset:size=64MiB,rate=100MB/s``:
  the pause it cost (target < 50 ms).

Uses the sim driver in-process (domain processes are started and destroyed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from relocd.drivers.base import DomainConfig
from relocd.drivers.sim.driver import SimDriver
from relocd.engine.policy import make_policy
from relocd.engine.reservation import ReservationTable
from relocd.engine.savefile import restore_savefile, save_domain
from relocd.engine.target import TargetContext

CHUNK = 8 << 20
HOTSET = "hotset:size=64MiB,rate=100MB/s"


def plain_write(memory: memoryview, path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, len(memory), CHUNK):
            os.write(fd, memory[off : off + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def plain_read(memory: memoryview, path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for off in range(0, len(memory), CHUNK):
            f.readinto(memory[off : off + CHUNK])
    return time.perf_counter() - t0


def evict(path: Path) -> bool:
    """Drop one file's pages from the page cache (not the whole cache: the machine is shared)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def line(label: str, seconds: float, nbytes: int, baseline: float | None = None) -> None:
    rate = nbytes / seconds / 1e9
    ratio = f"   ratio {baseline / seconds:5.2f}" if baseline else ""
    print(f"{label:<34} {seconds * 1000:9.1f} ms  {rate:6.2f} GB/s{ratio}")


async def main(memory_mib: int, folder: Path) -> None:
    state = Path(tempfile.mkdtemp(prefix="bench-save-state-"))
    driver = SimDriver(state)
    await driver.start()
    ctx = TargetContext(drivers={"sim": driver}, reservations=ReservationTable(60), journal=None)  # type: ignore[arg-type]
    policy = make_policy("downtime", downtime_ms=50)
    plain = folder / "plain.bin"
    saved = folder / "bench.save"
    try:
        dom = await driver.create(DomainConfig(name="bench", memory_mib=memory_mib, workload="idle"))
        await asyncio.sleep(0.5)
        await dom.pause()
        nbytes = dom.config.memory_bytes
        print(f"domain: {memory_mib} MiB, files in {folder}, {os.cpu_count()} CPUs")
        t_plain_w = plain_write(dom.memory(), plain)
        line("plain sequential write + fsync", t_plain_w, nbytes)
        await dom.resume()
        res = await save_domain(dom, saved, checkpoint=False, policy=policy)
        t_save = res.total_ms / 1000
        line("save (domain destroyed)", t_save, nbytes, t_plain_w)
        print(f"  file {saved.stat().st_size / 2**20:.1f} MiB, {res.zero_pages} zero pages")

        scratch = bytearray(nbytes)
        for warmth in ("warm", "cold"):
            if warmth == "cold" and not (evict(plain) and evict(saved)):
                print("  (cannot evict files from the page cache: no cold numbers)")
                break
            t_plain_r = plain_read(memoryview(scratch), plain)
            line(f"plain sequential read ({warmth})", t_plain_r, nbytes)
            t0 = time.perf_counter()
            await restore_savefile(str(saved), ctx)
            t_restore = time.perf_counter() - t0
            line(f"restore ({warmth}, digest pass + replay)", t_restore, nbytes, t_plain_r)
            restored = driver.lookup("bench")
            assert restored is not None
            await restored.destroy()
        del scratch

        dom = await driver.create(DomainConfig(name="hot", memory_mib=memory_mib, workload=HOTSET))
        await asyncio.sleep(1.0)
        pauses = []
        for _ in range(3):
            res = await save_domain(dom, folder / "hot.save", checkpoint=True, policy=policy)
            pauses.append(res.pause_ms)
            print(f"checkpoint under {HOTSET}: pause {res.pause_ms:.1f} ms, "
                  f"{res.iterations} rounds, total {res.total_ms:.0f} ms")  # fmt: skip
        print(f"checkpoint pause: best {min(pauses):.1f} ms, worst {max(pauses):.1f} ms (target < 50 ms)")
        await dom.destroy()
    finally:
        for d in driver.domains():
            await d.destroy()
        await driver.close()
        for p in (plain, saved, folder / "hot.save"):
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--warm-gib", type=int, default=3, help="touch this much memory first (0: skip)")
    args = parser.parse_args()
    if args.warm_gib:
        from bench_migrate import warm_host_memory  # same directory

        print(f"warmed {args.warm_gib} GiB of host memory in {warm_host_memory(args.warm_gib):.1f} s")
    asyncio.run(main(args.memory_mib, args.dir))
