"""vCPU state of a paused VM as one opaque, versioned blob (KvmDomain.save_state).

Layout (little endian)::

    header   magic "RLKVMST\\0", format version u32, section count u32,
             body length u64, CRC-32 of the body u32, reserved u32
    body     sections: tag (4 ASCII bytes), vCPU index u16, reserved u16,
             length u32, payload

Tags: ``META`` (JSON: vCPU count, xsave size, the VMM's workload progress),
and per vCPU ``REGS`` ``SREG`` ``XSAV`` (or ``FPU_`` without XSAVE) ``XCRS``
``MSRS`` ``EVTS`` ``MPST`` ``DBGR``.  Payloads are the raw kvm.h structures;
the size is checked against the limit before anything is parsed, the CRC
before anything is loaded, and each payload's length against its structure.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import struct
import zlib
from typing import Any

from relocd.drivers.kvm import ioctls as k
from relocd.drivers.kvm.vm import GuestVm, KvmSystem, Vcpu

MAGIC = b"RLKVMST\0"
FORMAT_VERSION = 1
MAX_BLOB = 16 << 20
_HEADER = struct.Struct("<8sIIQII")
_SECTION = struct.Struct("<4sHHI")

#: MSRs a guest may have touched that are not in kvm_sregs (EFER is).  Only
#: those the host's KVM lists in KVM_GET_MSR_INDEX_LIST are saved.
GUEST_MSRS = (
    0x10,  # IA32_TSC: the guest's clock continues where it stopped
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x277,  # IA32_PAT
    0x1A0,  # IA32_MISC_ENABLE
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR, LSTAR, CSTAR, SFMASK
    0xC0000102,  # KERNEL_GS_BASE
    0xC0000103,  # TSC_AUX
)


class StateError(Exception):
    """A blob that is not ours, damaged, or does not fit this VM."""


@dataclasses.dataclass
class VcpuCaps:
    """What this host's KVM can save, probed once per VM."""

    xsave_size: int  # 0: no XSAVE, use KVM_GET_FPU
    xcrs: bool
    msrs: tuple[int, ...]

    @classmethod
    def probe(cls, system: KvmSystem) -> VcpuCaps:
        xsave = 0
        if system.check_extension(k.KVM_CAP_XSAVE):
            xsave = max(ctypes.sizeof(k.kvm_xsave), system.check_extension(k.KVM_CAP_XSAVE2))
        listed = set(system.msr_index_list())
        return cls(
            xsave_size=xsave,
            xcrs=bool(system.check_extension(k.KVM_CAP_XCRS)),
            msrs=tuple(m for m in GUEST_MSRS if m in listed),
        )


def _get(vcpu: Vcpu, request: int, struct_type: Any) -> bytes:
    obj = struct_type()
    k.ioctl(vcpu.fd, request, obj)
    return bytes(obj)


def _get_msrs(vcpu: Vcpu, indices: tuple[int, ...]) -> bytes:
    """Entries (index u32, value u64) of the MSRs KVM could read; stops at the first it cannot."""
    entries, buf = k.msrs_buffer(list(indices))
    n = k.ioctl(vcpu.fd, k.KVM_GET_MSRS, buf)
    return b"".join(struct.pack("<IQ", entries[i].index, entries[i].data) for i in range(n))


def save_vcpu(vcpu: Vcpu, caps: VcpuCaps) -> list[tuple[bytes, bytes]]:
    """(tag, payload) sections of one stopped vCPU (no KVM_RUN in flight)."""
    out = [
        (b"REGS", _get(vcpu, k.KVM_GET_REGS, k.kvm_regs)),
        (b"SREG", _get(vcpu, k.KVM_GET_SREGS, k.kvm_sregs)),
    ]
    if caps.xsave_size:
        buf = (ctypes.c_uint8 * caps.xsave_size)()
        request = k.KVM_GET_XSAVE2 if caps.xsave_size > ctypes.sizeof(k.kvm_xsave) else k.KVM_GET_XSAVE
        k.ioctl(vcpu.fd, request, buf)
        out.append((b"XSAV", bytes(buf)))
    else:
        out.append((b"FPU_", _get(vcpu, k.KVM_GET_FPU, k.kvm_fpu)))
    if caps.xcrs:
        out.append((b"XCRS", _get(vcpu, k.KVM_GET_XCRS, k.kvm_xcrs)))
    out.append((b"MSRS", _get_msrs(vcpu, caps.msrs)))
    out.append((b"EVTS", _get(vcpu, k.KVM_GET_VCPU_EVENTS, k.kvm_vcpu_events)))
    out.append((b"MPST", _get(vcpu, k.KVM_GET_MP_STATE, k.kvm_mp_state)))
    out.append((b"DBGR", _get(vcpu, k.KVM_GET_DEBUGREGS, k.kvm_debugregs)))
    return out


def save_vm(vm: GuestVm, caps: VcpuCaps, progress: dict[str, Any]) -> bytes:
    """The blob for every vCPU of a paused VM plus the VMM's workload progress."""
    meta = {"vcpus": len(vm.vcpus), "xsave_size": caps.xsave_size, "progress": progress}
    sections: list[tuple[bytes, int, bytes]] = []
    for vcpu in vm.vcpus:
        sections += [(tag, vcpu.index, payload) for tag, payload in save_vcpu(vcpu, caps)]
    return pack(meta, sections)


def pack(meta: dict[str, Any], sections: list[tuple[bytes, int, bytes]]) -> bytes:
    """Header + META + (tag, vcpu, payload) sections, CRC over the body."""
    allsec = [(b"META", 0, json.dumps(meta).encode()), *sections]
    body = b"".join(_SECTION.pack(tag, idx, 0, len(p)) + p for tag, idx, p in allsec)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(allsec), len(body), zlib.crc32(body), 0)
    return header + body


def parse(blob: bytes) -> tuple[dict[str, Any], dict[int, dict[bytes, bytes]]]:
    """(meta, {vcpu: {tag: payload}}) of a blob, after checking size, magic, version and CRC."""
    if len(blob) > MAX_BLOB:
        raise StateError(f"state blob of {len(blob)} bytes exceeds the {MAX_BLOB} byte limit")
    if len(blob) < _HEADER.size:
        raise StateError("state blob truncated")
    magic, version, count, length, crc, _ = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise StateError("state blob was not saved by the kvm driver")
    if version > FORMAT_VERSION:
        raise StateError(f"state blob format {version} is newer than this relocd ({FORMAT_VERSION})")
    body = memoryview(blob)[_HEADER.size :]
    if len(body) != length:
        raise StateError("state blob truncated")
    if zlib.crc32(body) != crc:
        raise StateError("state blob is corrupted (CRC mismatch)")
    meta: dict[str, Any] | None = None
    vcpus: dict[int, dict[bytes, bytes]] = {}
    off = 0
    for _ in range(count):
        if off + _SECTION.size > len(body):
            raise StateError("state blob section table truncated")
        tag, idx, _, size = _SECTION.unpack_from(body, off)
        off += _SECTION.size
        payload = bytes(body[off : off + size])
        if len(payload) != size:
            raise StateError("state blob section truncated")
        off += size
        if tag == b"META":
            try:
                meta = json.loads(payload)
            except ValueError:
                raise StateError("state blob META section is not JSON") from None
        else:
            vcpus.setdefault(idx, {})[tag] = payload
    if meta is None or not isinstance(meta, dict):
        raise StateError("state blob has no META section")
    return meta, vcpus


def _set(vcpu: Vcpu, request: int, struct_type: Any, payload: bytes, tag: bytes) -> None:
    if len(payload) != ctypes.sizeof(struct_type):
        raise StateError(f"vCPU {vcpu.index} {tag.decode()} has {len(payload)} bytes, expected {ctypes.sizeof(struct_type)}")
    k.ioctl(vcpu.fd, request, struct_type.from_buffer_copy(payload))


def load_vcpu(vcpu: Vcpu, sections: dict[bytes, bytes], caps: VcpuCaps) -> None:
    """Put saved state into a vCPU that has not run yet (CPUID already set at creation).

    Order, as QEMU's kvm_arch_put_registers does it:
    1. REGS, then XSAVE (or FPU) and XCRS: plain register files, no checks
       against the mode; XCR0 is validated against CPUID, not against CR4.
    2. SREGS: control registers and EFER; this switches the vCPU into long
       mode, and KVM validates CR0/CR4/EFER combinations here.
    3. MSRs after SREGS: some MSR writes are checked against the mode and
       EFER just set, and writing IA32_TSC must come after anything that could
       reset the TSC offset.
    4. VCPU_EVENTS after SREGS and MSRs: a pending exception or NMI is
       interpreted against the restored mode (KVM rejects some otherwise).
    5. MP_STATE last: it makes the vCPU runnable (or halted) once everything
       it would run with is in place.  DEBUGREGS are independent.
    """
    need = [b"REGS", b"SREG", b"MSRS", b"EVTS", b"MPST"]
    missing = [t.decode() for t in need if t not in sections]
    if missing:
        raise StateError(f"vCPU {vcpu.index} state lacks {', '.join(missing)}")
    _set(vcpu, k.KVM_SET_REGS, k.kvm_regs, sections[b"REGS"], b"REGS")
    if b"XSAV" in sections:
        if not caps.xsave_size:
            raise StateError("state has XSAVE data but this host's KVM has no XSAVE")
        payload = sections[b"XSAV"]
        buf = (ctypes.c_uint8 * max(caps.xsave_size, len(payload)))()
        ctypes.memmove(buf, payload, len(payload))
        k.ioctl(vcpu.fd, k.KVM_SET_XSAVE, buf)
    elif b"FPU_" in sections:
        _set(vcpu, k.KVM_SET_FPU, k.kvm_fpu, sections[b"FPU_"], b"FPU_")
    if b"XCRS" in sections and caps.xcrs:
        _set(vcpu, k.KVM_SET_XCRS, k.kvm_xcrs, sections[b"XCRS"], b"XCRS")
    _set(vcpu, k.KVM_SET_SREGS, k.kvm_sregs, sections[b"SREG"], b"SREG")
    raw = sections[b"MSRS"]
    if len(raw) % 12:
        raise StateError(f"vCPU {vcpu.index} MSRS section is malformed")
    pairs = [struct.unpack_from("<IQ", raw, off) for off in range(0, len(raw), 12)]
    if pairs:
        entries, buf = k.msrs_buffer([index for index, _ in pairs])
        for i, (_, value) in enumerate(pairs):
            entries[i].data = value
        n = k.ioctl(vcpu.fd, k.KVM_SET_MSRS, buf)
        if n != len(pairs):
            raise StateError(f"vCPU {vcpu.index}: KVM refused MSR {pairs[n][0]:#x}")
    _set(vcpu, k.KVM_SET_VCPU_EVENTS, k.kvm_vcpu_events, sections[b"EVTS"], b"EVTS")
    if b"DBGR" in sections:
        _set(vcpu, k.KVM_SET_DEBUGREGS, k.kvm_debugregs, sections[b"DBGR"], b"DBGR")
    _set(vcpu, k.KVM_SET_MP_STATE, k.kvm_mp_state, sections[b"MPST"], b"MPST")


def load_vm(vm: GuestVm, caps: VcpuCaps, blob: bytes) -> dict[str, Any]:
    """Load a blob into every vCPU of a not-yet-started VM; returns the saved progress."""
    meta, vcpus = parse(blob)
    if meta.get("vcpus") != len(vm.vcpus) or sorted(vcpus) != list(range(len(vm.vcpus))):
        raise StateError(f"state is for {meta.get('vcpus')} vCPUs, this VM has {len(vm.vcpus)}")
    if int(meta.get("xsave_size", 0)) > max(caps.xsave_size, ctypes.sizeof(k.kvm_xsave)):
        raise StateError("state carries a larger XSAVE area than this host supports")
    for vcpu in vm.vcpus:
        load_vcpu(vcpu, vcpus[vcpu.index], caps)
    progress = meta.get("progress", {})
    return progress if isinstance(progress, dict) else {}
