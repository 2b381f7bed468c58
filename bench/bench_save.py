"""Save and restore throughput against a plain sequential copy of the same bytes, and the checkpoint pause.

Not a test: run ``python bench/bench_save.py [--memory-mib 1024] [--dir DIR] [--repeats 3]``
by hand.  Every figure is a ratio measured side by side, in one run, on the
same file system, each pair in alternating order (plain first, then ours
first) so that drift on a shared machine falls on both sides:

* plain write: the domain's memory to a file in 8 MiB ``os.write`` calls,
  then fsync.  ``save``: the same domain through ``save_domain`` (header,
  records, both digests, fsync, rename).  ratio = plain / save (target >= 0.8).
* plain read: the savefile itself, 8 MiB ``readinto`` calls, into *fresh*
  anonymous memory (what a restore must fill: a new domain's memory exists
  only once touched) and, for reference, into memory already touched.
  ``restore``: ``restore_savefile`` (header, trailer, reservation, build,
  the load with the digest checked meanwhile, resume).  ratio = plain / restore
  (target >= 0.8), with the file in the page cache (warm) and evicted (cold:
  ``posix_fadvise(DONTNEED)`` on just the two files after an fsync, the
  machine being shared; the share of each file still cached is printed).
* ``save --checkpoint`` of a domain running ``hotset:size=64MiB,rate=100MB/s``:
  the pause it cost (target < 50 ms); ``--no-checkpoint`` skips it.

Uses the sim driver in-process (domain processes are started and destroyed).
The domain's pages are all non-zero (the sim guest's invariant writes each one).
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from relocd.drivers.base import DomainConfig
from relocd.drivers.populate import resident
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


def plain_read(path: Path, into: memoryview | None = None) -> float:
    """Read the whole file; into ``into`` (touched memory) or a fresh anonymous mapping."""
    size = path.stat().st_size
    t0 = time.perf_counter()
    area = None
    if into is None:
        area = mmap.mmap(-1, size)
        into = memoryview(area)
    try:
        with open(path, "rb", buffering=0) as f:
            for off in range(0, size, CHUNK):
                f.readinto(into[off : off + CHUNK])
        return time.perf_counter() - t0
    finally:
        if area is not None:
            into.release()
            area.close()


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


def cached_share(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (mincore on a mapping of it)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as area:
        vec = resident(area)
        return float(vec.mean()) if len(vec) else 0.0


def line(label: str, seconds: float, nbytes: int, baseline: float | None = None) -> None:
    rate = nbytes / seconds / 1e9
    ratio = f"   ratio {baseline / seconds:5.2f}" if baseline else ""
    print(f"  {label:<40} {seconds * 1000:8.1f} ms  {rate:6.2f} GB/s{ratio}", flush=True)


async def main(memory_mib: int, folder: Path, repeats: int, checkpoint: bool) -> None:
    state = Path(tempfile.mkdtemp(prefix="bench-save-state-"))
    driver = SimDriver(state)
    await driver.start()
    ctx = TargetContext(drivers={"sim": driver}, reservations=ReservationTable(60), journal=None)  # type: ignore[arg-type]
    policy = make_policy("downtime", downtime_ms=50)
    plain = folder / "plain.bin"
    saved = folder / "bench.save"
    ratios: dict[str, list[float]] = {k: [] for k in ("save", "warm", "warm-touched", "cold", "cold-touched")}
    try:
        dom = await driver.create(DomainConfig(name="bench", memory_mib=memory_mib, workload="idle"))
        await asyncio.sleep(0.5)
        nbytes = dom.config.memory_bytes
        scratch = bytearray(nbytes + (64 << 20))  # the file is a little bigger than memory
        np.frombuffer(scratch, dtype=np.uint8)[:: mmap.PAGESIZE] = 1  # touched once, here
        touched = memoryview(scratch)
        print(f"domain: {memory_mib} MiB, files in {folder}, {os.cpu_count()} CPUs, {repeats} repeats, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        for i in range(repeats):
            ours_first = i % 2 == 1
            print(f"repeat {i + 1} ({'ours' if ours_first else 'plain'} first)", flush=True)

            # -- save against write + fsync --------------------------------------------
            async def timed_save() -> float:
                res = await save_domain(dom, saved, checkpoint=False, policy=policy)
                return res.total_ms / 1000

            def timed_plain_write() -> float:
                return plain_write(dom.memory(), plain)

            if ours_first:
                await dom.pause()
                t_save = await timed_save()
                t_plain_w = 0.0  # written below, from the restored domain
            else:
                await dom.pause()
                t_plain_w = timed_plain_write()
                t_save = await timed_save()
            size = saved.stat().st_size

            # -- restore against a plain read of the savefile, warm then cold ------------
            async def timed_restore() -> float:
                t0 = time.perf_counter()
                await restore_savefile(str(saved), ctx)
                return time.perf_counter() - t0

            for warmth in ("warm", "cold"):
                cold = warmth == "cold"
                if cold and not evict(saved):
                    print("  (cannot evict files from the page cache: no cold numbers)")
                    break
                if cold:
                    print(f"  cached before the cold pair: savefile {cached_share(saved):.0%}", flush=True)
                if ours_first:
                    t_restore = await timed_restore()
                    if cold:
                        evict(saved)
                    t_plain_r = plain_read(saved)
                else:
                    t_plain_r = plain_read(saved)
                    if cold:
                        evict(saved)
                    t_restore = await timed_restore()
                if cold:
                    evict(saved)
                t_touched = plain_read(saved, touched)
                line(f"plain read, fresh memory ({warmth})", t_plain_r, size)
                line(f"plain read, touched memory ({warmth})", t_touched, size)
                line(f"restore ({warmth})", t_restore, size, t_plain_r)
                ratios[warmth].append(t_plain_r / t_restore)
                ratios[f"{warmth}-touched"].append(t_touched / t_restore)
                restored = driver.lookup("bench")
                assert restored is not None
                dom = restored
                if not cold:
                    await dom.destroy()
            if driver.lookup("bench") is None:  # no cold pair: the next repeat needs a domain
                await restore_savefile(str(saved), ctx)
                dom = driver.lookup("bench")  # type: ignore[assignment]
            if ours_first:
                await dom.pause()
                t_plain_w = timed_plain_write()
                await dom.resume()
            line("plain write + fsync", t_plain_w, nbytes)
            line("save", t_save, size, t_plain_w)
            ratios["save"].append(t_plain_w / t_save)
            plain.unlink(missing_ok=True)
        touched.release()
        del touched, scratch

        print(f"ratios (median of the repeats; each repeat's in brackets; load average now "
              f"{os.getloadavg()[0]:.1f}); target >= 0.8:")  # fmt: skip
        for key, label in (
            ("save", "save / (write + fsync)"),
            ("warm", "restore / read, warm, fresh memory"),
            ("cold", "restore / read, cold, fresh memory"),
            ("warm-touched", "restore / read, warm, touched memory"),
            ("cold-touched", "restore / read, cold, touched memory"),
        ):
            values = ratios[key]
            if values:
                each = " ".join(f"{v:.2f}" for v in values)
                print(f"  {label:<40} {statistics.median(values):5.2f}   [{each}]")
        await dom.destroy()

        if checkpoint:
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint pause figures")
    parser.add_argument("--warm-gib", type=int, default=3, help="touch this much memory first (0: skip)")
    args = parser.parse_args()
    if args.warm_gib:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_migrate import warm_host_memory  # same directory

        print(f"warmed {args.warm_gib} GiB of host memory in {warm_host_memory(args.warm_gib):.1f} s")
    asyncio.run(main(args.memory_mib, args.dir, args.repeats, not args.no_checkpoint))
