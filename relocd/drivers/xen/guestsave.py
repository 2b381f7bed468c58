"""libxenguest's save through ctypes: ``xc_domain_save`` with relocd's callbacks.

Layouts are Xen 4.17's ``xenguest.h``: ``struct precopy_stats`` (passed *by
value* to the policy callback: libffi handles that), ``struct
save_callbacks`` (seven pointers), ``XCFLAGS_LIVE``, ``XC_STREAM_PLAIN``.
``tests/system/test_xen.py`` checks sizes and offsets against a C compiler's
view of the installed headers.

The suspend callback does for a PV guest what libxl does when the guest has
no suspend event channel (``libxl_dom_suspend.c``): write ``suspend`` to
``/local/domain/N/control/shutdown``, wait for the domain to shut down with
reason ``SHUTDOWN_suspend``, and withdraw the request if it does not.  A
failed save is undone as ``libxl_domain_resume(.., suspend_cancel=1)`` does:
``xc_domain_resume(fast=1)`` and xenstore's resume.

PVH guests save the same way (Linux answers the same xenstore request);
libxenguest then writes an HVM stream (HVM_CONTEXT, HVM_PARAMS records in
place of PV's page tables and P2M), which relocd carries as opaque bytes like
any other.  For any HVM-flagged domain ``xc_domain_save`` *asserts* that a
``switch_qemu_logdirty`` callback is set (a NULL one aborts the whole
process): relocd's answers "done", as libxl does for a domain without a
device model.  A full HVM guest has one (qemu), whose dirty pages and device
state relocd does not carry, so its save is refused before it starts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time

from relocd.drivers.xen import libxc
from relocd.drivers.xen.precopy import ABORT, PolicyBridge
from relocd.errors import DriverError

log = logging.getLogger(__name__)

XCFLAGS_LIVE = 1 << 0
XC_STREAM_PLAIN = 0
SHUTDOWN_SUSPEND = 2  # xen/sched.h
SUSPEND_TIMEOUT_S = 60.0  # libxl waits as long (and TCG is slow)
XTL_WARN = 7  # xentoollog.h: warnings and errors only, not libxc's per-batch progress lines
XTL_STDIOSTREAM_HIDE_PROGRESS = 0o4

_quiet_logger: int | None = None


def quiet_logger() -> int | None:
    """One libxentoollog logger for the process: libxc's warnings and errors on stderr, no progress.

    libxc's default logger prints a progress line every 2048 pages and info
    lines per save, which would fill a daemon's log.  None (libxc's default)
    where the library or libc's ``stderr`` cannot be had.
    """
    global _quiet_logger
    if _quiet_logger is None:
        try:
            lib = libxc.load_library("xentoollog", "libxentoollog.so.1")
            stderr = ctypes.c_void_p.in_dll(ctypes.CDLL(None), "stderr").value
        except (DriverError, ValueError):
            return None
        lib.xtl_createlogger_stdiostream.restype = ctypes.c_void_p
        lib.xtl_createlogger_stdiostream.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
        _quiet_logger = lib.xtl_createlogger_stdiostream(stderr, XTL_WARN, XTL_STDIOSTREAM_HIDE_PROGRESS) or None
    return _quiet_logger


class PrecopyStats(ctypes.Structure):
    """struct precopy_stats (xenguest.h)."""

    _fields_ = [("iteration", ctypes.c_uint), ("total_written", ctypes.c_ulong), ("dirty_count", ctypes.c_long)]


PRECOPY_POLICY = ctypes.CFUNCTYPE(ctypes.c_int, PrecopyStats, ctypes.c_void_p)
DATA_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
LOGDIRTY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32, ctypes.c_uint, ctypes.c_void_p)


class SaveCallbacks(ctypes.Structure):
    """struct save_callbacks (xenguest.h); unset members stay NULL."""

    _fields_ = [
        ("suspend", DATA_CALLBACK),
        ("precopy_policy", PRECOPY_POLICY),
        ("postcopy", DATA_CALLBACK),
        ("checkpoint", DATA_CALLBACK),
        ("wait_checkpoint", DATA_CALLBACK),
        ("switch_qemu_logdirty", LOGDIRTY_CALLBACK),
        ("data", ctypes.c_void_p),
    ]


class GuestSaver:
    """Saves domains of this dom0 with libxenguest; one save at a time per instance."""

    def __init__(self, ctrl: libxc.XenCtrl, store: libxc.XenStore, *, suspend_timeout: float = SUSPEND_TIMEOUT_S):
        self._ctrl = ctrl
        self._store = store
        self.suspend_timeout = suspend_timeout
        xenctrl = libxc.load_library("xenctrl", "libxenctrl.so.4.17")
        guest = libxc.load_library("xenguest", "libxenguest.so.4.17")
        xenctrl.xc_interface_open.restype = ctypes.c_void_p
        xenctrl.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        xenctrl.xc_interface_close.argtypes = [ctypes.c_void_p]
        guest.xc_domain_save.restype = ctypes.c_int
        guest.xc_domain_save.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32,
            ctypes.POINTER(SaveCallbacks), ctypes.c_int, ctypes.c_int,
        ]  # fmt: skip
        guest.xc_domain_resume.restype = ctypes.c_int
        guest.xc_domain_resume.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
        self._xenctrl = xenctrl
        self._guest = guest
        self.suspended_at: float | None = None  # monotonic time the guest acknowledged suspend
        self.callback_error: str | None = None

    def _open(self) -> int:
        logger = quiet_logger()
        handle = self._xenctrl.xc_interface_open(logger, logger, 0)
        if not handle:
            raise DriverError(f"xen driver: xc_interface_open failed: {libxc.errno_text()}")
        return int(handle)

    def save(self, domid: int, fd: int, bridge: PolicyBridge | None, *, live: bool = True) -> None:
        """Write domain ``domid``'s libxenguest stream to ``fd``; returns with the domain suspended.

        ``bridge`` answers every precopy_policy call (live saves only).
        """
        info = self._ctrl.domain(domid)
        if info is not None and info.guest_type == "hvm":
            raise DriverError(
                f"xen driver: domain {domid} is an HVM guest: its device model's state (qemu) does not travel"
                " in relocd's stream (PV and PVH guests do; move HVM guests with xl migrate)"
            )
        self.suspended_at = None
        self.callback_error = None

        def on_suspend(_data: int | None) -> int:
            try:
                if self.suspend(domid):
                    return 1
                self.callback_error = (
                    f"the guest did not answer the suspend request within {self.suspend_timeout:.0f}s"
                    " (request withdrawn; it runs on)"
                )
                return 0
            except Exception as exc:  # noqa: BLE001 - a callback must not raise into C
                self.callback_error = f"suspend: {exc}"
                return 0

        def on_policy(stats: PrecopyStats, _data: int | None) -> int:
            if bridge is None:
                return 0
            try:
                return bridge.decide(int(stats.iteration), int(stats.total_written), int(stats.dirty_count))
            except Exception as exc:  # noqa: BLE001 - likewise
                self.callback_error = f"precopy policy: {exc}"
                return ABORT

        def on_qemu_logdirty(_domid: int, _enable: int, _data: int | None) -> int:
            return 0  # no device model (PVH; PV guests are never asked): nothing else dirties memory

        callbacks = SaveCallbacks()
        keep = (DATA_CALLBACK(on_suspend), PRECOPY_POLICY(on_policy), LOGDIRTY_CALLBACK(on_qemu_logdirty))
        callbacks.suspend, callbacks.precopy_policy, callbacks.switch_qemu_logdirty = keep
        xch = self._open()
        try:
            flags = XCFLAGS_LIVE if live else 0
            rc = self._guest.xc_domain_save(xch, fd, domid, flags, ctypes.byref(callbacks), XC_STREAM_PLAIN, -1)
            err = ctypes.get_errno()
        finally:
            self._xenctrl.xc_interface_close(xch)
        del keep
        if rc != 0:
            why = self.callback_error or (f"{os.strerror(err)} (errno {err})" if err else "see libxenguest's messages")
            raise DriverError(f"xen driver: xc_domain_save of domain {domid} failed: {why}")

    def suspend(self, domid: int) -> bool:
        """Ask a PV guest to suspend itself; True once Xen reports it shut down for suspend."""
        path = f"/local/domain/{domid}/control/shutdown"
        self._store.write(path, "suspend")
        deadline = time.monotonic() + self.suspend_timeout
        while time.monotonic() < deadline:
            info = self._ctrl.domain(domid)
            if info is None:
                raise DriverError(f"xen driver: domain {domid} vanished while suspending")
            if info.shutdown:
                if info.shutdown_reason == SHUTDOWN_SUSPEND:
                    self.suspended_at = time.monotonic()
                    return True
                raise DriverError(f"xen driver: domain {domid} shut down (reason {info.shutdown_reason}), not suspended")
            time.sleep(0.005)
        if self._store.read(path) == "suspend":
            self._store.write(path, "")  # withdraw the request, as libxl does
        log.warning("xen driver: domain %d did not suspend within %.0fs", domid, self.suspend_timeout)
        return False

    def resume(self, domid: int) -> None:
        """Cancel a suspend: the guest runs on from where it stopped (before GO only)."""
        info = self._ctrl.domain(domid)
        if info is None or not (info.shutdown and info.shutdown_reason == SHUTDOWN_SUSPEND):
            return  # never suspended (the save failed during precopy): nothing to undo
        xch = self._open()
        try:
            rc = self._guest.xc_domain_resume(xch, domid, 1)
        finally:
            self._xenctrl.xc_interface_close(xch)
        if rc != 0:
            raise DriverError(f"xen driver: xc_domain_resume of domain {domid} failed: {libxc.errno_text()}")
        self._store.resume_domain(domid)
