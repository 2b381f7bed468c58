"""libxenctrl and libxenstore through ctypes: the few calls the xen driver makes directly.

These are the hot, stable, fixed-layout calls (domain list, pause, unpause,
physical info, CPU featuresets, xenstore reads): one hypercall or one xenstore
request each, no process to fork.  Everything that builds or tears down a
domain's devices goes through ``xl`` instead (see ``xl.py`` and docs/xen.md).

Struct layouts follow Xen 4.17's public headers (``xen/domctl.h``,
``xen/sysctl.h``); ``tests/system/test_xen.py`` compares them with a C
compiler's view of the installed headers where ``libxen-dev`` is present.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import threading
import uuid as uuidlib

from relocd.errors import DriverError

PAGE_SHIFT = 12

# XEN_DOMINF_* (xen/domctl.h)
DOMINF_DYING = 1 << 0
DOMINF_HVM = 1 << 1
DOMINF_SHUTDOWN = 1 << 2
DOMINF_PAUSED = 1 << 3
DOMINF_BLOCKED = 1 << 4
DOMINF_RUNNING = 1 << 5
#: XEN_X86_EMU_LAPIC (arch-x86/xen.h): the one device Xen emulates for a PVH guest;
#: an HVM guest has the PIC, IOAPIC, RTC, ... too (and a device model, qemu)
X86_EMU_LAPIC = 1 << 0
SHUTDOWN_SHIFT = 16
SHUTDOWN_MASK = 0xFF

# XEN_SYSCTL_cpu_featureset_* (xen/sysctl.h)
FEATURESET_HOST = 1
FEATURESET_PV = 2
FEATURESET_PV_MAX = 4

XBT_NULL = 0


class ArchDomainConfig(ctypes.Structure):
    _fields_ = [("emulation_flags", ctypes.c_uint32), ("misc_flags", ctypes.c_uint32)]


class DomctlDomainInfo(ctypes.Structure):
    """struct xen_domctl_getdomaininfo (xc_domaininfo_t)."""

    _fields_ = [
        ("domain", ctypes.c_uint16),
        ("pad1", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("tot_pages", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("outstanding_pages", ctypes.c_uint64),
        ("shr_pages", ctypes.c_uint64),
        ("paged_pages", ctypes.c_uint64),
        ("shared_info_frame", ctypes.c_uint64),
        ("cpu_time", ctypes.c_uint64),
        ("nr_online_vcpus", ctypes.c_uint32),
        ("max_vcpu_id", ctypes.c_uint32),
        ("ssidref", ctypes.c_uint32),
        ("handle", ctypes.c_uint8 * 16),
        ("cpupool", ctypes.c_uint32),
        ("gpaddr_bits", ctypes.c_uint8),
        ("pad2", ctypes.c_uint8 * 7),
        ("arch_config", ArchDomainConfig),
    ]


class PhysInfo(ctypes.Structure):
    """struct xen_sysctl_physinfo (xc_physinfo_t)."""

    _fields_ = [
        ("threads_per_core", ctypes.c_uint32),
        ("cores_per_socket", ctypes.c_uint32),
        ("nr_cpus", ctypes.c_uint32),
        ("max_cpu_id", ctypes.c_uint32),
        ("nr_nodes", ctypes.c_uint32),
        ("max_node_id", ctypes.c_uint32),
        ("cpu_khz", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("arch_capabilities", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("total_pages", ctypes.c_uint64),
        ("free_pages", ctypes.c_uint64),
        ("scrub_pages", ctypes.c_uint64),
        ("outstanding_pages", ctypes.c_uint64),
        ("max_mfn", ctypes.c_uint64),
        ("hw_cap", ctypes.c_uint32 * 8),
    ]


@dataclasses.dataclass(frozen=True)
class DomInfo:
    """One domain as the hypervisor sees it."""

    domid: int
    uuid: str
    flags: int
    tot_pages: int
    max_pages: int
    max_vcpu_id: int
    online_vcpus: int
    cpu_time_ns: int
    #: arch_config.emulation_flags: which devices Xen emulates (XEN_X86_EMU_*)
    emulation_flags: int = 0

    @property
    def paused(self) -> bool:
        return bool(self.flags & DOMINF_PAUSED)

    @property
    def dying(self) -> bool:
        return bool(self.flags & DOMINF_DYING)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & DOMINF_SHUTDOWN)

    @property
    def shutdown_reason(self) -> int:
        return self.flags >> SHUTDOWN_SHIFT & SHUTDOWN_MASK

    @property
    def hvm(self) -> bool:
        return bool(self.flags & DOMINF_HVM)

    @property
    def guest_type(self) -> str:
        """libxl's name for the guest's type: ``pv``, ``pvh`` or ``hvm``.

        Xen flags PVH guests as HVM ones (both run in a hardware container);
        what tells them apart is that Xen emulates nothing but the local APIC
        for a PVH guest.
        """
        if not self.hvm:
            return "pv"
        return "pvh" if self.emulation_flags & ~X86_EMU_LAPIC == 0 else "hvm"

    @classmethod
    def from_c(cls, c: DomctlDomainInfo) -> DomInfo:
        return cls(
            domid=int(c.domain),
            uuid=str(uuidlib.UUID(bytes=bytes(c.handle))),
            flags=int(c.flags),
            tot_pages=int(c.tot_pages),
            max_pages=int(c.max_pages),
            max_vcpu_id=int(c.max_vcpu_id),
            online_vcpus=int(c.nr_online_vcpus),
            cpu_time_ns=int(c.cpu_time),
            emulation_flags=int(c.arch_config.emulation_flags),
        )


def load_library(name: str, soname: str) -> ctypes.CDLL:
    path = ctypes.util.find_library(name) or soname
    try:
        return ctypes.CDLL(path, use_errno=True)
    except OSError as exc:
        raise DriverError(f"xen driver: cannot load {soname} (is this a Xen dom0 with Xen's tools?): {exc}") from None


class XenCtrl:
    """An open libxenctrl handle (``/dev/xen/privcmd``); calls are serialised."""

    def __init__(self) -> None:
        self._lib = load_library("xenctrl", "libxenctrl.so.4.17")
        self._guest = load_library("xenguest", "libxenguest.so.4.17")
        lib = self._lib
        lib.xc_interface_open.restype = ctypes.c_void_p
        lib.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        lib.xc_interface_close.argtypes = [ctypes.c_void_p]
        lib.xc_domain_getinfolist.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint, ctypes.POINTER(DomctlDomainInfo)
        ]
        lib.xc_physinfo.argtypes = [ctypes.c_void_p, ctypes.POINTER(PhysInfo)]
        for fn in (lib.xc_domain_pause, lib.xc_domain_unpause):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        self._guest.xc_get_cpu_featureset.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)
        ]
        self._guest.xc_get_cpu_featureset_size.restype = ctypes.c_uint32
        self._lock = threading.Lock()
        handle = lib.xc_interface_open(None, None, 0)
        if not handle:
            raise DriverError(f"xen driver: xc_interface_open failed: {errno_text()} (not dom0, or no privcmd?)")
        self._xch: int | None = handle

    def _handle(self) -> int:
        if self._xch is None:
            raise DriverError("xen driver: libxenctrl handle is closed")
        return self._xch

    def close(self) -> None:
        with self._lock:
            if self._xch is not None:
                self._lib.xc_interface_close(self._xch)
                self._xch = None

    def domains(self, max_domains: int = 1024) -> list[DomInfo]:
        """Every domain, dom0 included, in domid order."""
        buf = (DomctlDomainInfo * max_domains)()
        with self._lock:
            n = self._lib.xc_domain_getinfolist(self._handle(), 0, max_domains, buf)
        if n < 0:
            raise DriverError(f"xen driver: xc_domain_getinfolist failed: {errno_text()}")
        return [DomInfo.from_c(buf[i]) for i in range(n)]

    def domain(self, domid: int) -> DomInfo | None:
        buf = DomctlDomainInfo()
        with self._lock:
            n = self._lib.xc_domain_getinfolist(self._handle(), domid, 1, ctypes.byref(buf))
        if n < 0:
            raise DriverError(f"xen driver: xc_domain_getinfolist failed: {errno_text()}")
        return DomInfo.from_c(buf) if n == 1 and buf.domain == domid else None

    def pause(self, domid: int) -> None:
        with self._lock:
            rc = self._lib.xc_domain_pause(self._handle(), domid)
        if rc != 0:
            raise DriverError(f"xen driver: pausing domain {domid} failed: {errno_text()}")

    def unpause(self, domid: int) -> None:
        with self._lock:
            rc = self._lib.xc_domain_unpause(self._handle(), domid)
        if rc != 0:
            raise DriverError(f"xen driver: unpausing domain {domid} failed: {errno_text()}")

    def physinfo(self) -> PhysInfo:
        info = PhysInfo()
        with self._lock:
            rc = self._lib.xc_physinfo(self._handle(), ctypes.byref(info))
        if rc != 0:
            raise DriverError(f"xen driver: xc_physinfo failed: {errno_text()}")
        return info

    def featureset(self, index: int) -> list[int]:
        """One of Xen's CPU featuresets (FEATURESET_*), as 32-bit words in Xen's word order."""
        size = int(self._guest.xc_get_cpu_featureset_size())
        words = (ctypes.c_uint32 * size)()
        nr = ctypes.c_uint32(size)
        with self._lock:
            rc = self._guest.xc_get_cpu_featureset(self._handle(), index, ctypes.byref(nr), words)
        if rc != 0:
            raise DriverError(f"xen driver: xc_get_cpu_featureset({index}) failed: {errno_text()}")
        return [int(words[i]) for i in range(min(nr.value, size))]


class XenStore:
    """A libxenstore connection (to xenstored's socket or /dev/xen/xenbus)."""

    def __init__(self) -> None:
        lib = load_library("xenstore", "libxenstore.so.4")
        lib.xs_open.restype = ctypes.c_void_p
        lib.xs_open.argtypes = [ctypes.c_ulong]
        lib.xs_close.argtypes = [ctypes.c_void_p]
        lib.xs_read.restype = ctypes.c_void_p
        lib.xs_read.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint)]
        lib.xs_write.restype = ctypes.c_bool
        lib.xs_write.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        lib.xs_resume_domain.restype = ctypes.c_bool
        lib.xs_resume_domain.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self._lib = lib
        self._libc = ctypes.CDLL(None)
        self._libc.free.argtypes = [ctypes.c_void_p]
        self._lock = threading.Lock()
        handle = lib.xs_open(0)
        if not handle:
            raise DriverError(f"xen driver: cannot connect to xenstore: {errno_text()} (is xenstored running?)")
        self._xsh: int | None = handle

    def close(self) -> None:
        with self._lock:
            if self._xsh is not None:
                self._lib.xs_close(self._xsh)
                self._xsh = None

    def read(self, path: str) -> str | None:
        """The value at path, or None if there is none."""
        length = ctypes.c_uint(0)
        with self._lock:
            if self._xsh is None:
                raise DriverError("xen driver: xenstore connection is closed")
            ptr = self._lib.xs_read(self._xsh, XBT_NULL, path.encode(), ctypes.byref(length))
        if not ptr:
            return None
        try:
            return ctypes.string_at(ptr, length.value).decode(errors="replace")
        finally:
            self._libc.free(ptr)

    def write(self, path: str, value: str) -> None:
        data = value.encode()
        with self._lock:
            if self._xsh is None:
                raise DriverError("xen driver: xenstore connection is closed")
            ok = self._lib.xs_write(self._xsh, XBT_NULL, path.encode(), data, len(data))
        if not ok:
            raise DriverError(f"xen driver: xenstore write of {path} failed: {errno_text()}")

    def resume_domain(self, domid: int) -> None:
        """Tell xenstored a suspended domain runs again (its watches fire again)."""
        with self._lock:
            if self._xsh is None:
                raise DriverError("xen driver: xenstore connection is closed")
            ok = self._lib.xs_resume_domain(self._xsh, domid)
        if not ok:
            raise DriverError(f"xen driver: xenstore resume of domain {domid} failed: {errno_text()}")


def errno_text() -> str:
    err = ctypes.get_errno()
    return f"{os.strerror(err)} (errno {err})" if err else "unknown error"
