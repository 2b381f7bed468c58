"""The kvm driver's pieces that need no /dev/kvm: ioctl ABI, guest build, layout, state blob."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from relocd.drivers.kvm import cpufeatures, ioctls, layout, state
from relocd.drivers.kvm.runner import MAX_BATCH_PAGES, Pacer, batch_pages
from relocd.units import PAGE_SIZE

GUEST_DIR = Path(ioctls.__file__).with_name("guest")

#: ioctl numbers as linux/kvm.h defines them on x86-64 (printed by a C program
#: compiled against the kernel headers); each encodes its argument's size.
KVM_H_NUMBERS = {
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_GET_XSAVE2": 0x9000AECF,
}
KVM_H_PLAIN = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_RUN": 0xAE80,
}


@pytest.mark.parametrize("name", sorted(ioctls.SIZED_IOCTLS))
def test_struct_size_matches_size_in_ioctl_number(name: str) -> None:
    number, struct = ioctls.SIZED_IOCTLS[name]
    assert ioctls.ioctl_size(KVM_H_NUMBERS[name]) == ctypes.sizeof(struct), name
    assert number == KVM_H_NUMBERS[name], f"{name}: {number:#x} != {KVM_H_NUMBERS[name]:#x}"


def test_every_sized_ioctl_is_checked() -> None:
    assert set(ioctls.SIZED_IOCTLS) == set(KVM_H_NUMBERS)


@pytest.mark.parametrize("name", sorted(KVM_H_PLAIN))
def test_argumentless_ioctls(name: str) -> None:
    assert getattr(ioctls, name) == KVM_H_PLAIN[name]


def test_kvm_run_exit_union_offset() -> None:
    assert ioctls.kvm_run.exit_reason.offset == 8
    assert ioctls.kvm_run.exit.offset == 32
    assert ctypes.sizeof(ioctls.kvm_run_io) == 16


C_PROBE = r"""
#include <stdio.h>
#include <linux/kvm.h>
#define P(x) printf("%s %lu\n", #x, (unsigned long)(x));
int main(void) {
@PROBES@
  return 0;
}
"""


@pytest.mark.skipif(
    shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists(),
    reason="needs gcc and the kernel headers (linux/kvm.h)",
)
def test_numbers_match_this_hosts_kvm_h(tmp_path: Path) -> None:
    names = sorted(KVM_H_NUMBERS) + sorted(KVM_H_PLAIN)
    src = tmp_path / "probe.c"
    src.write_text(C_PROBE.replace("@PROBES@", "\n".join(f"P({n})" for n in names)))
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        name, value = line.split()
        assert getattr(ioctls, name) == int(value), name


# ---------------------------------------------------------------- guest binary


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None, reason="needs binutils (as, ld)")
def test_committed_guest_binary_matches_a_fresh_build(tmp_path: Path) -> None:
    out = tmp_path / "guest.bin"
    subprocess.run(["sh", str(GUEST_DIR / "build.sh"), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == (GUEST_DIR / "guest.bin").read_bytes(), "run relocd/drivers/kvm/guest/build.sh"


def test_guest_checksum_constants_match_the_source() -> None:
    source = (GUEST_DIR / "guest.s").read_text()
    assert f"{layout.K1:#X}".replace("0X", "0x") in source
    assert f"{layout.K2:#X}".replace("0X", "0x") in source
    for port in (layout.PORT_BATCH, layout.PORT_IDLE, layout.PORT_AP_IDLE):
        assert f"{port:#x}" in source


# ---------------------------------------------------------------- layout and invariant


@pytest.mark.parametrize("mib", [1, 4, 64, 1024, 1025, 4096])
def test_layout_fits_memory(mib: int) -> None:
    npages = (mib << 20) // PAGE_SIZE
    lay = layout.GuestLayout.for_pages(npages)
    gen_pages = -(-lay.ndata // 512)
    assert lay.gentab_addr // PAGE_SIZE + gen_pages == lay.data_start
    assert lay.data_start + lay.ndata <= npages
    assert npages - (lay.data_start + lay.ndata) < 2  # nothing worth mentioning wasted
    assert lay.n_pd == max(1, -(-mib // 1024))
    assert lay.gentab_addr >= layout.PD_ADDR + lay.n_pd * PAGE_SIZE


def test_layout_rejects_tiny_and_huge() -> None:
    with pytest.raises(ValueError):
        layout.GuestLayout.for_pages(40)
    with pytest.raises(ValueError):
        layout.GuestLayout.for_pages((layout.MAX_MEMORY_GIB + 1) << 18)


def _guest_write(mem: memoryview, pfn: int) -> None:
    """Write one page the way guest/guest.s does."""
    ctl = layout.read_ctl(mem)
    idx = pfn - ctl["data_start"]
    table = np.frombuffer(mem, dtype=np.uint64, count=ctl["ndata"], offset=ctl["gentab"])
    words = np.frombuffer(mem, dtype=np.uint64, count=512, offset=pfn * PAGE_SIZE)
    g = table[idx] + np.uint64(1)
    c = layout.checksum(np.array([pfn], dtype=np.uint64), np.array([g], dtype=np.uint64))[0]
    words[0], words[1], words[2], words[511] = pfn, g, c, c
    table[idx] = g
    ctl_words = np.frombuffer(mem, dtype=np.uint64, count=len(layout.CtlField), offset=layout.CTL_ADDR)
    ctl_words[layout.CtlField.WRITTEN] += np.uint64(1)


@pytest.fixture(params=[False, True], ids=["zero", "stamped"])
def booted(request: pytest.FixtureRequest) -> memoryview:
    mem = memoryview(bytearray(4 << 20))
    layout.write_boot_image(mem, b"\xf4", layout.WorkloadKind.UNIFORM, 8, 0, 1, stamped=request.param)
    return mem


def test_fresh_image_holds_the_invariant(booted: memoryview) -> None:
    assert layout.check_invariant(booted) is None
    ctl = layout.read_ctl(booted)
    assert ctl["magic"] == layout.CTL_MAGIC and ctl["batch"] == 8


def test_written_pages_hold_the_invariant(booted: memoryview) -> None:
    start = layout.read_ctl(booted)["data_start"]
    for pfn in (start, start + 5, start + 5, start + 100):
        _guest_write(booted, pfn)
    assert layout.check_invariant(booted) is None


def test_stale_page_is_detected(booted: memoryview) -> None:
    pfn = layout.read_ctl(booted)["data_start"] + 7
    old = bytes(booted[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE])
    _guest_write(booted, pfn)
    booted[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = old  # the new version never arrived
    problem = layout.check_invariant(booted)
    assert problem is not None and f"pfn {pfn}" in problem


def test_garbage_in_a_page_is_detected(booted: memoryview) -> None:
    pfn = layout.read_ctl(booted)["data_start"] + 3
    booted[pfn * PAGE_SIZE + 100] = 1
    assert layout.check_invariant(booted) is not None


def test_lost_table_update_is_detected(booted: memoryview) -> None:
    ctl = layout.read_ctl(booted)
    table = np.frombuffer(booted, dtype=np.uint64, count=ctl["ndata"], offset=ctl["gentab"])
    _guest_write(booted, ctl["data_start"])
    table[0] -= np.uint64(1)
    assert layout.check_invariant(booted) is not None


def test_page_in_flight_is_skipped(booted: memoryview) -> None:
    ctl = layout.read_ctl(booted)
    pfn = ctl["data_start"] + 9
    words = np.frombuffer(booted, dtype=np.uint64, count=len(layout.CtlField), offset=layout.CTL_ADDR)
    words[layout.CtlField.INFLIGHT] = pfn
    booted[pfn * PAGE_SIZE] = 0xAB  # half written when the guest stopped
    assert layout.check_invariant(booted) is None
    words[layout.CtlField.INFLIGHT] = 0
    assert layout.check_invariant(booted) is not None


def test_missing_control_page() -> None:
    assert "control page" in (layout.check_invariant(memoryview(bytearray(4 << 20))) or "")


# ---------------------------------------------------------------- state blob


def _blob() -> bytes:
    return state.pack({"vcpus": 1, "xsave_size": 0, "progress": {"pages": 3}},
                      [(b"REGS", 0, bytes(ctypes.sizeof(ioctls.kvm_regs)))])


def test_state_blob_round_trip() -> None:
    meta, vcpus = state.parse(_blob())
    assert meta["progress"] == {"pages": 3}
    assert vcpus == {0: {b"REGS": bytes(144)}}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"XXXXXXXX" + b[8:], "not saved by the kvm driver"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "CRC"),
        (lambda b: b[:-4], "truncated"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:8] + (99).to_bytes(4, "little") + b[12:], "newer"),
        (lambda b: b + bytes(state.MAX_BLOB), "limit"),
    ],
)
def test_damaged_state_blob_is_refused(damage: object, message: str) -> None:
    with pytest.raises(state.StateError, match=message):
        state.parse(damage(_blob()))  # type: ignore[operator]


# ---------------------------------------------------------------- small helpers


def test_feature_names() -> None:
    entries = [(1, 0, 0, 0, (1 << 20) | (1 << 0), (1 << 25) | (1 << 26)), (7, 0, 0, 1 << 5, 0, 0),
               (7, 1, 0, 1 << 5, 0, 0)]
    assert cpufeatures.feature_names(entries) == {"sse4_2", "pni", "sse", "sse2", "avx2"}


def test_batches_and_pacing() -> None:
    assert batch_pages(0) == 1
    assert batch_pages(100 * 1000**2) == int(100 * 1000**2 / PAGE_SIZE * 0.005)
    assert batch_pages(1 << 40) == MAX_BATCH_PAGES
    pacer = Pacer(PAGE_SIZE * 1000)  # 1000 pages/s
    assert 0.05 < pacer.delay_after(100) <= 0.1
    assert Pacer(0).delay_after(100) == 0.0
