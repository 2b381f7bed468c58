"""The KVM ioctl ABI through ctypes: structures laid out as in linux/kvm.h.

Only what the micro-VMM needs (x86-64).  Every ioctl number is built with the
same ``_IO/_IOR/_IOW/_IOWR`` arithmetic as the kernel headers, from the
structure it carries, so a wrong ctypes layout changes the number and the
kernel rejects the call (tests/unit/test_kvm_abi.py checks both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

c_u8 = ctypes.c_uint8
c_u16 = ctypes.c_uint16
c_u32 = ctypes.c_uint32
c_u64 = ctypes.c_uint64

KVMIO = 0xAE
KVM_API_VERSION = 12

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    assert size < (1 << 14), size
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (KVMIO << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: Any) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: Any) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: Any) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


def ioctl_size(request: int) -> int:
    """The argument size encoded in an ioctl number (what _IOW & co. put there)."""
    return (request >> _IOC_SIZESHIFT) & ((1 << 14) - 1)


# --------------------------------------------------------------------------
# structures (linux/kvm.h, asm/kvm.h)


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_u32),
        ("flags", c_u32),
        ("guest_phys_addr", c_u64),
        ("memory_size", c_u64),
        ("userspace_addr", c_u64),
    ]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", c_u32), ("padding1", c_u32), ("dirty_bitmap", c_u64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [
        ("slot", c_u32),
        ("num_pages", c_u32),
        ("first_page", c_u64),
        ("dirty_bitmap", c_u64),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [
        ("cap", c_u32),
        ("flags", c_u32),
        ("args", c_u64 * 4),
        ("pad", c_u8 * 64),
    ]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_u64)
        for name in (
            ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"]
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_u64),
        ("limit", c_u32),
        ("selector", c_u16),
        ("type", c_u8),
        ("present", c_u8),
        ("dpl", c_u8),
        ("db", c_u8),
        ("s", c_u8),
        ("l", c_u8),
        ("g", c_u8),
        ("avl", c_u8),
        ("unusable", c_u8),
        ("padding", c_u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_u64), ("limit", c_u16), ("padding", c_u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *[(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *[(name, c_u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", c_u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_u8 * 16) * 8),
        ("fcw", c_u16),
        ("fsw", c_u16),
        ("ftwx", c_u8),
        ("pad1", c_u8),
        ("last_opcode", c_u16),
        ("last_ip", c_u64),
        ("last_dp", c_u64),
        ("xmm", (c_u8 * 16) * 16),
        ("mxcsr", c_u32),
        ("pad2", c_u32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_u32), ("reserved", c_u32), ("data", c_u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries follow (flexible array), see msrs_buffer()."""

    _fields_ = [("nmsrs", c_u32), ("pad", c_u32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; u32 indices follow."""

    _fields_ = [("nmsrs", c_u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_u32),
        ("index", c_u32),
        ("flags", c_u32),
        ("eax", c_u32),
        ("ebx", c_u32),
        ("ecx", c_u32),
        ("edx", c_u32),
        ("padding", c_u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; kvm_cpuid_entry2 entries follow, see cpuid_buffer()."""

    _fields_ = [("nent", c_u32), ("padding", c_u32)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_u32)]


class _events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", c_u8),
        ("nr", c_u8),
        ("has_error_code", c_u8),
        ("pending", c_u8),
        ("error_code", c_u32),
    ]


class _events_4u8(ctypes.Structure):
    _fields_ = [("a", c_u8), ("b", c_u8), ("c", c_u8), ("d", c_u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_4u8),
        ("nmi", _events_4u8),
        ("sipi_vector", c_u32),
        ("flags", c_u32),
        ("smi", _events_4u8),
        ("triple_fault", c_u8),
        ("reserved", c_u8 * 26),
        ("exception_has_payload", c_u8),
        ("exception_payload", c_u64),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", c_u64 * 4),
        ("dr6", c_u64),
        ("dr7", c_u64),
        ("flags", c_u64),
        ("reserved", c_u64 * 9),
    ]


class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", c_u32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_u32), ("reserved", c_u32), ("value", c_u64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_u32),
        ("flags", c_u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_u64 * 16),
    ]


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", c_u8),
        ("size", c_u8),
        ("port", c_u16),
        ("count", c_u32),
        ("data_offset", c_u64),
    ]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("hardware_exit_reason", c_u64),
        ("internal_suberror", c_u32),
        ("pad", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    """The head of the shared kvm_run page (the exit union and what precedes it)."""

    _fields_ = [
        ("request_interrupt_window", c_u8),
        ("immediate_exit", c_u8),
        ("padding1", c_u8 * 6),
        ("exit_reason", c_u32),
        ("ready_for_interrupt_injection", c_u8),
        ("if_flag", c_u8),
        ("flags", c_u16),
        ("cr8", c_u64),
        ("apic_base", c_u64),
        ("exit", kvm_run_exit),
    ]


# --------------------------------------------------------------------------
# ioctl numbers

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)

KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, c_u64)

KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, kvm_debugregs)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, kvm_xcrs)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, kvm_clear_dirty_log)
KVM_GET_XSAVE2 = _ior(0xCF, kvm_xsave)

#: (ioctl number, structure it carries) for the ABI test.
SIZED_IOCTLS: dict[str, tuple[int, Any]] = {
    "KVM_GET_MSR_INDEX_LIST": (KVM_GET_MSR_INDEX_LIST, kvm_msr_list),
    "KVM_GET_SUPPORTED_CPUID": (KVM_GET_SUPPORTED_CPUID, kvm_cpuid2),
    "KVM_GET_DIRTY_LOG": (KVM_GET_DIRTY_LOG, kvm_dirty_log),
    "KVM_SET_USER_MEMORY_REGION": (KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region),
    "KVM_SET_IDENTITY_MAP_ADDR": (KVM_SET_IDENTITY_MAP_ADDR, c_u64),
    "KVM_GET_REGS": (KVM_GET_REGS, kvm_regs),
    "KVM_SET_REGS": (KVM_SET_REGS, kvm_regs),
    "KVM_GET_SREGS": (KVM_GET_SREGS, kvm_sregs),
    "KVM_SET_SREGS": (KVM_SET_SREGS, kvm_sregs),
    "KVM_GET_MSRS": (KVM_GET_MSRS, kvm_msrs),
    "KVM_SET_MSRS": (KVM_SET_MSRS, kvm_msrs),
    "KVM_GET_FPU": (KVM_GET_FPU, kvm_fpu),
    "KVM_SET_FPU": (KVM_SET_FPU, kvm_fpu),
    "KVM_SET_CPUID2": (KVM_SET_CPUID2, kvm_cpuid2),
    "KVM_GET_MP_STATE": (KVM_GET_MP_STATE, kvm_mp_state),
    "KVM_SET_MP_STATE": (KVM_SET_MP_STATE, kvm_mp_state),
    "KVM_GET_VCPU_EVENTS": (KVM_GET_VCPU_EVENTS, kvm_vcpu_events),
    "KVM_SET_VCPU_EVENTS": (KVM_SET_VCPU_EVENTS, kvm_vcpu_events),
    "KVM_GET_DEBUGREGS": (KVM_GET_DEBUGREGS, kvm_debugregs),
    "KVM_SET_DEBUGREGS": (KVM_SET_DEBUGREGS, kvm_debugregs),
    "KVM_ENABLE_CAP": (KVM_ENABLE_CAP, kvm_enable_cap),
    "KVM_GET_XSAVE": (KVM_GET_XSAVE, kvm_xsave),
    "KVM_SET_XSAVE": (KVM_SET_XSAVE, kvm_xsave),
    "KVM_GET_XCRS": (KVM_GET_XCRS, kvm_xcrs),
    "KVM_SET_XCRS": (KVM_SET_XCRS, kvm_xcrs),
    "KVM_CLEAR_DIRTY_LOG": (KVM_CLEAR_DIRTY_LOG, kvm_clear_dirty_log),
    "KVM_GET_XSAVE2": (KVM_GET_XSAVE2, kvm_xsave),
}

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_NR_VCPUS = 9
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_XSAVE2 = 208

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_MP_STATE_RUNNABLE = 0

# --------------------------------------------------------------------------
# calling


class KvmCallError(OSError):
    """An ioctl failed; carries the ioctl's name for a one-line message."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_") and isinstance(v, int)}


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """ioctl(2) without holding the GIL (ctypes.CDLL releases it), so a vCPU
    thread blocked in KVM_RUN does not stop the rest of the VMM.

    ``arg`` is None, an int (passed by value) or a ctypes object (passed by
    reference).
    """
    if arg is None:
        ptr: int | None = 0
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret: int = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        name = _NAMES.get(request, hex(request))
        raise KvmCallError(err, f"{name}: {os.strerror(err)}")
    return ret


def msrs_buffer(indices: list[int]) -> tuple[ctypes.Array[Any], Any]:
    """A kvm_msrs header followed by ``len(indices)`` entries, as one buffer."""

    class _Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_u32), ("pad", c_u32), ("entries", kvm_msr_entry * len(indices))]

    buf = _Msrs()
    buf.nmsrs = len(indices)
    for i, index in enumerate(indices):
        buf.entries[i].index = index
    return buf.entries, buf


def cpuid_buffer(nent: int) -> Any:
    """A kvm_cpuid2 header with room for ``nent`` entries."""

    class _Cpuid(ctypes.Structure):
        _fields_ = [("nent", c_u32), ("padding", c_u32), ("entries", kvm_cpuid_entry2 * nent)]

    buf = _Cpuid()
    buf.nent = nent
    return buf
