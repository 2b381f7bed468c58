"""One KVM virtual machine: the VM fd, its memory slot, its vCPUs.

This module only talks to KVM; threads, pacing and the socket live in
runner.py and vmm.py.  KVM binds a VM to the process that created it (VM and
vCPU ioctls from another process fail with EIO), so everything here runs in
the per-VM process; only guest memory and the dirty bitmap buffer are shared
with the daemon, as memfds.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Any

from relocd.drivers.kvm import ioctls as k
from relocd.drivers.kvm.layout import CODE_ADDR, GDT_ADDR, PML4_ADDR, STACK_TOP
from relocd.units import PAGE_SIZE

KVM_DEVICE = "/dev/kvm"
MEMORY_SLOT = 0
#: Real-mode TSS pages KVM wants on Intel; only set below 4 GiB guests.
TSS_ADDR = 0xFFFBD000

# control register and EFER bits for a long-mode guest
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 31,
)
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


class KvmSystem:
    """The /dev/kvm system fd: capabilities and host-wide queries."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = k.ioctl(self.fd, k.KVM_GET_API_VERSION)
            if version != k.KVM_API_VERSION:
                raise OSError(errno.EINVAL, f"KVM API version {version}, need {k.KVM_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap)

    def max_vcpus(self) -> int:
        return self.check_extension(k.KVM_CAP_MAX_VCPUS) or self.check_extension(k.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> Any:
        """KVM_GET_SUPPORTED_CPUID; grows the buffer until it fits (E2BIG)."""
        nent = 128
        while True:
            buf = k.cpuid_buffer(nent)
            try:
                k.ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, buf)
                return buf
            except OSError as exc:
                if exc.errno != errno.E2BIG or nent >= 4096:
                    raise
                nent *= 2

    def msr_index_list(self) -> list[int]:
        n = 512

        class _List(ctypes.Structure):
            _fields_ = [("nmsrs", k.c_u32), ("indices", k.c_u32 * n)]

        buf = _List()
        buf.nmsrs = n
        k.ioctl(self.fd, k.KVM_GET_MSR_INDEX_LIST, buf)
        return [int(buf.indices[i]) for i in range(buf.nmsrs)]


class Vcpu:
    """One vCPU fd and its mmapped kvm_run page."""

    def __init__(self, system: KvmSystem, vm_fd: int, index: int, cpuid: Any) -> None:
        self.index = index
        self.fd = k.ioctl(vm_fd, k.KVM_CREATE_VCPU, index)
        size = k.ioctl(system.fd, k.KVM_GET_VCPU_MMAP_SIZE)
        self._run_map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = k.kvm_run.from_buffer(self._run_map)
        # CPUID first: KVM sizes the XSAVE area and validates MSRs against it,
        # and refuses to change it once the vCPU has run.
        k.ioctl(self.fd, k.KVM_SET_CPUID2, cpuid)

    def io_data(self) -> int:
        """The first 4 bytes of the current KVM_EXIT_IO data, as an int."""
        off = int(self.run.exit.io.data_offset)
        return int.from_bytes(self._run_map[off : off + 4], "little")

    def enter_long_mode(self) -> None:
        """Flat 64-bit segments, identity paging (tables in guest memory), rip at the guest code."""
        sregs = k.kvm_sregs()
        k.ioctl(self.fd, k.KVM_GET_SREGS, sregs)
        code = k.kvm_segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=11, present=1,
                             dpl=0, db=0, s=1, l=1, g=1)
        data = k.kvm_segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, present=1,
                             dpl=0, db=1, s=1, l=0, g=1)
        sregs.cs = code
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
        # a 64-bit busy TSS, as VM entry demands in long mode
        sregs.tr = k.kvm_segment(base=0, limit=0x67, selector=0x18, type=11, present=1, s=0)
        sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, 3 * 8 - 1
        sregs.cr3 = PML4_ADDR
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
        k.ioctl(self.fd, k.KVM_SET_SREGS, sregs)
        regs = k.kvm_regs()
        regs.rflags = 0x2
        regs.rip = CODE_ADDR
        regs.rsp = STACK_TOP
        regs.rdi = self.index
        k.ioctl(self.fd, k.KVM_SET_REGS, regs)

    def close(self) -> None:
        try:
            del self.run
            self._run_map.close()
        except (AttributeError, BufferError):
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestVm:
    """A VM with one memory slot over a memfd, logging dirty pages on request."""

    def __init__(self, system: KvmSystem, memfd: int, memory_bytes: int, nvcpus: int,
                 *, manual_protect: bool) -> None:
        self.system = system
        self.memory_bytes = memory_bytes
        self.npages = memory_bytes // PAGE_SIZE
        self.fd = k.ioctl(system.fd, k.KVM_CREATE_VM, 0)
        self.vcpus: list[Vcpu] = []
        if memory_bytes <= TSS_ADDR:
            k.ioctl(self.fd, k.KVM_SET_TSS_ADDR, TSS_ADDR)
        self.memory = mmap.mmap(memfd, memory_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mem_anchor = ctypes.c_char.from_buffer(self.memory)
        self.memory_addr = ctypes.addressof(self._mem_anchor)
        self.manual_protect = manual_protect and bool(
            system.check_extension(k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        )
        if self.manual_protect:
            cap = k.kvm_enable_cap(cap=k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            cap.args[0] = k.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            k.ioctl(self.fd, k.KVM_ENABLE_CAP, cap)
        self.logging = False
        self._set_region(0)
        cpuid = system.supported_cpuid()
        for i in range(nvcpus):
            self.vcpus.append(Vcpu(system, self.fd, i, cpuid))

    def _set_region(self, flags: int) -> None:
        region = k.kvm_userspace_memory_region(
            slot=MEMORY_SLOT, flags=flags, guest_phys_addr=0,
            memory_size=self.memory_bytes, userspace_addr=self.memory_addr,
        )
        k.ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region)

    def dirty_log_start(self, bitmap_addr: int) -> None:
        """Turn logging on with every page clean (re-registering the slot resets it)."""
        if self.logging:
            self._set_region(0)
        self._set_region(k.KVM_MEM_LOG_DIRTY_PAGES)
        self.logging = True

    def dirty_log_stop(self) -> None:
        if self.logging:
            self._set_region(0)
            self.logging = False

    def dirty_log_fetch(self, bitmap_addr: int) -> None:
        """Write the pages dirtied since the last fetch into the bitmap at ``bitmap_addr`` and reset them.

        Without manual protect, KVM_GET_DIRTY_LOG copies and clears in one
        call.  With it, GET only copies, and KVM_CLEAR_DIRTY_LOG then clears
        and write-protects exactly the pages we were told about; a write
        landing between the two is on a page already reported, whose content
        the caller copies afterwards.
        """
        if not self.logging:
            raise OSError(errno.EINVAL, "dirty logging is off")
        log = k.kvm_dirty_log(slot=MEMORY_SLOT, dirty_bitmap=bitmap_addr)
        k.ioctl(self.fd, k.KVM_GET_DIRTY_LOG, log)
        if self.manual_protect:
            clear = k.kvm_clear_dirty_log(slot=MEMORY_SLOT, num_pages=self.npages,
                                          first_page=0, dirty_bitmap=bitmap_addr)
            k.ioctl(self.fd, k.KVM_CLEAR_DIRTY_LOG, clear)

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            del self._mem_anchor
            self.memory.close()
        except (AttributeError, BufferError):
            pass
