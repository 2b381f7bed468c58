"""Cost of one dirty-log fetch-and-clear on a 1 GiB KVM guest, KVM_GET_DIRTY_LOG vs KVM_CLEAR_DIRTY_LOG.

    python bench/bench_kvm_dirty_log.py [--mib 1024] [--rounds 5]

For each mode ("get": KVM_GET_DIRTY_LOG copies and clears; "clear": manual
protect, KVM_GET_DIRTY_LOG copies and KVM_CLEAR_DIRTY_LOG clears and
re-protects) and each dirty count, the guest (our own, sweep workload)
writes that many pages, then one fetch is timed; the median of the rounds
is printed.  The guest's writes are not timed.  Needs a usable /dev/kvm.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import struct
import sys
import time

import numpy as np

from relocd.drivers.kvm import ioctls as k
from relocd.drivers.kvm import layout
from relocd.drivers.kvm.vm import GuestVm, KvmSystem
from relocd.drivers.kvm.vmm import GUEST_BINARY, bitmap_bytes
from relocd.units import PAGE_SIZE


def run_guest_pages(vm: GuestVm, pages: int) -> None:
    """Let the guest write ``pages`` pages (one batch, ended by its OUT)."""
    struct.pack_into("<Q", vm.memory, layout.CTL_ADDR + 8 * layout.CtlField.BATCH, pages)
    vcpu = vm.vcpus[0]
    k.ioctl(vcpu.fd, k.KVM_RUN)
    if vcpu.run.exit_reason != k.KVM_EXIT_IO or vcpu.run.exit.io.port != layout.PORT_BATCH:
        raise SystemExit(f"guest stopped unexpectedly (exit reason {vcpu.run.exit_reason})")


def measure(mode: str, mib: int, counts: list[int], rounds: int) -> dict[int, tuple[float, int]]:
    system = KvmSystem()
    size = mib << 20
    fd = os.memfd_create("bench-kvm")
    os.ftruncate(fd, size)
    vm = GuestVm(system, fd, size, 1, manual_protect=(mode == "clear"))
    if mode == "clear" and not vm.manual_protect:
        raise SystemExit("this KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
    bitmap = np.zeros(bitmap_bytes(size // PAGE_SIZE) // 8, dtype=np.uint64)
    addr = bitmap.ctypes.data_as(ctypes.c_void_p).value or 0
    try:
        layout.write_boot_image(memoryview(vm.memory), GUEST_BINARY.read_bytes(), layout.WorkloadKind.SWEEP, 1, 0, 1)
        vm.vcpus[0].enter_long_mode()
        run_guest_pages(vm, 1)
        vm.dirty_log_start(addr)
        out: dict[int, tuple[float, int]] = {}
        for count in counts:
            times, seen = [], 0
            for _ in range(rounds):
                if count:
                    run_guest_pages(vm, count)
                t0 = time.perf_counter()
                vm.dirty_log_fetch(addr)
                times.append(time.perf_counter() - t0)
                seen = int(np.unpackbits(bitmap.view(np.uint8)).sum())
            out[count] = (statistics.median(times) * 1e6, seen)
        return out
    finally:
        vm.close()
        os.close(fd)
        system.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--counts", default="0,64,32768", help="dirty pages per fetch, comma separated")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print(f"guest memory {args.mib} MiB ({(args.mib << 20) // PAGE_SIZE} pages), median of {args.rounds} fetches")
    print(f"{'mode':6} {'written':>8} {'reported':>9} {'fetch+clear us':>15}")
    for mode in ("get", "clear"):
        for count, (us, seen) in measure(mode, args.mib, counts, args.rounds).items():
            print(f"{mode:6} {count:8d} {seen:9d} {us:15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
