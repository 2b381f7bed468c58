"""The xen driver against real Xen: Xen 4.17 nested under QEMU (tests/xenlab/).

Two parts:

* host-only checks (no Xen needed): the ctypes layouts against Xen's headers
  where ``libxen-dev`` and a C compiler are present, featureset naming, the
  libxl-JSON/xl-config conversions, and the clear refusal on a host without Xen;
* lab checks (marked ``system``): boot the lab once per module (about a
  minute under TCG once the image is cached; building the image from Debian's
  packages takes about five more), then drive relocd's xen driver inside dom0
  against a running PV domU, and run ``xl migrate`` to localhost, the
  reference a relocd migration will be compared with.

The lab checks skip, with the reason, when RELOCD_XENLAB=0, without root,
without QEMU/debootstrap/busybox-static/cpio, or when the image cannot be
built (no Debian mirror).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relocd.drivers import load_driver
from relocd.drivers.base import Domain, DomainConfig, Vif
from relocd.drivers.xen import config as xencfg
from relocd.drivers.xen import guestsave, libxc, stream, xlimage
from relocd.drivers.xen.features import featureset_names
from relocd.drivers.xen.precopy import (
    ABORT,
    CONTINUE_PRECOPY,
    STOP_AND_COPY,
    PolicyBridge,
)
from relocd.engine.policy import (
    DIRTY_THRESHOLD,
    MAX_ITERATIONS,
    DowntimePolicy,
    XendPolicy,
)
from relocd.errors import DriverError
from tests.xenlab.lab import XenLab, image_or_skip

# -- host-only ------------------------------------------------------------------

LAYOUT_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <xenctrl.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu\n", sizeof(xc_domaininfo_t), sizeof(xc_physinfo_t),
           offsetof(xc_domaininfo_t, cpu_time), offsetof(xc_domaininfo_t, handle),
           offsetof(xc_domaininfo_t, arch_config), offsetof(xc_physinfo_t, free_pages),
           offsetof(xc_physinfo_t, hw_cap));
    return 0;
}
"""


def c_view(tmp_path: Path, program: str, name: str, header: str) -> list[int]:
    """Compile ``program`` against Xen's ``header`` and run it: the numbers it prints."""
    if shutil.which("cc") is None or not Path(f"/usr/include/{header}").exists():
        pytest.skip("needs a C compiler and libxen-dev's headers")
    src = tmp_path / f"{name}.c"
    src.write_text(program)
    subprocess.run(["cc", "-o", str(tmp_path / name), str(src)], check=True, capture_output=True)
    return [int(x) for x in subprocess.check_output([str(tmp_path / name)]).split()]


def test_ctypes_layouts_match_xen_headers(tmp_path: Path) -> None:
    c_layout = c_view(tmp_path, LAYOUT_PROGRAM, "layout", "xenctrl.h")
    ours = [
        ctypes.sizeof(libxc.DomctlDomainInfo),
        ctypes.sizeof(libxc.PhysInfo),
        libxc.DomctlDomainInfo.cpu_time.offset,
        libxc.DomctlDomainInfo.handle.offset,
        libxc.DomctlDomainInfo.arch_config.offset,
        libxc.PhysInfo.free_pages.offset,
        libxc.PhysInfo.hw_cap.offset,
    ]
    assert ours == c_layout


SAVE_LAYOUT_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <xenctrl.h>
#include <xenguest.h>
static struct precopy_stats given = {7, 123456789UL, -1};
/* libxenguest passes precopy_stats by value: check ctypes' callback sees it whole. */
int call_policy(precopy_policy_t policy, void *data) { return policy(given, data); }
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu %d %d %d %d\n", sizeof(struct precopy_stats),
           offsetof(struct precopy_stats, total_written), offsetof(struct precopy_stats, dirty_count),
           sizeof(struct save_callbacks), offsetof(struct save_callbacks, precopy_policy),
           offsetof(struct save_callbacks, switch_qemu_logdirty), offsetof(struct save_callbacks, data),
           XCFLAGS_LIVE, XC_STREAM_PLAIN, XGS_POLICY_STOP_AND_COPY, XGS_POLICY_ABORT);
    return 0;
}
"""


def test_save_callback_layouts_match_xenguest_h(tmp_path: Path) -> None:
    c_layout = c_view(tmp_path, SAVE_LAYOUT_PROGRAM, "save_layout", "xenguest.h")
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libpolicy.so"), str(tmp_path / "save_layout.c")],
        check=True, capture_output=True,
    )  # fmt: skip
    G = guestsave
    ours = [
        ctypes.sizeof(G.PrecopyStats), G.PrecopyStats.total_written.offset, G.PrecopyStats.dirty_count.offset,
        ctypes.sizeof(G.SaveCallbacks), G.SaveCallbacks.precopy_policy.offset,
        G.SaveCallbacks.switch_qemu_logdirty.offset, G.SaveCallbacks.data.offset,
        G.XCFLAGS_LIVE, G.XC_STREAM_PLAIN, STOP_AND_COPY, ABORT,
    ]  # fmt: skip
    assert ours == c_layout
    seen: list[tuple[int, int, int, int | None]] = []

    def policy(stats: guestsave.PrecopyStats, data: int | None) -> int:
        seen.append((stats.iteration, stats.total_written, stats.dirty_count, data))
        return STOP_AND_COPY

    lib = ctypes.CDLL(str(tmp_path / "libpolicy.so"))
    lib.call_policy.argtypes = [guestsave.PRECOPY_POLICY, ctypes.c_void_p]
    assert lib.call_policy(guestsave.PRECOPY_POLICY(policy), 42) == STOP_AND_COPY
    assert seen == [(7, 123456789, -1, 42)]


def fake_send_memory_live(bridge: PolicyBridge, p2m_size: int, dirty: list[int], sent: list[int]) -> list[int]:
    """Xen 4.17's send_memory_live call pattern; the decisions it got (its page counts go to ``sent``)."""
    total, x, dirty_count, decisions = 0, 0, p2m_size, []
    while True:
        decision = bridge.decide(x, total, dirty_count)
        decisions.append(decision)
        x += 1
        if dirty_count > 0 and decision != ABORT:
            sent.append(dirty_count)
        if decision != CONTINUE_PRECOPY:
            return decisions
        total += dirty_count
        decision = bridge.decide(x, total, -1)
        decisions.append(decision)
        if decision != CONTINUE_PRECOPY:
            return decisions
        dirty_count = dirty[x - 1]


def test_policy_bridge_lets_relocd_decide_each_round() -> None:
    sent: list[int] = []
    bridge = PolicyBridge(XendPolicy(max_iterations=3, dirty_threshold=0), lambda: sum(sent) * 4100)
    decisions = fake_send_memory_live(bridge, 32768, [900, 400, 300, 200], sent)
    assert decisions == [CONTINUE_PRECOPY] * 6 + [STOP_AND_COPY]
    assert [(r.round, r.pages_sent, r.dirty_pages, r.stop_reason) for r in bridge.rounds] == [
        (1, 32768, 900, None), (2, 900, 400, None), (3, 400, 300, MAX_ITERATIONS),
    ]  # fmt: skip
    assert bridge.rounds[1].bytes_sent == 900 * 4100 and bridge.stop_reason == MAX_ITERATIONS
    assert sent == [32768, 900, 400, 300]  # libxenguest sends the last dirty set live, then suspends
    assert bridge.memory_pages == 32768


def test_policy_bridge_small_dirty_set_and_cancel() -> None:
    sent: list[int] = []
    bridge = PolicyBridge(DowntimePolicy(), lambda: sum(sent) * 4096)
    fake_send_memory_live(bridge, 32768, [12], sent)
    assert [(r.round, r.stop_reason) for r in bridge.rounds] == [(1, DIRTY_THRESHOLD)]
    cancelled = PolicyBridge(DowntimePolicy(), lambda: 0)
    assert cancelled.decide(0, 0, 32768) == CONTINUE_PRECOPY
    cancelled.cancel()
    assert cancelled.decide(1, 32768, -1) == ABORT


async def test_loop_caller_cut_frees_a_thread_stuck_on_the_transport() -> None:
    """A save thread blocked on a full transport queue must not outlive a cancel."""
    loop = asyncio.get_running_loop()
    caller = stream.LoopCaller(loop)
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)

    def worker() -> str:
        try:
            for _ in range(3):
                caller.call(queue.put(b"chunk"))
        except BaseException as exc:  # noqa: BLE001 - what the pump would record
            return type(exc).__name__
        return "finished"

    job = asyncio.ensure_future(asyncio.to_thread(worker))
    await asyncio.sleep(0.2)
    assert not job.done() and queue.qsize() == 1  # stuck on the second put
    caller.cut()
    assert await asyncio.wait_for(job, 5) == "CancelledError"
    with pytest.raises(DriverError, match="cancelled"):
        await asyncio.to_thread(caller.call, queue.put(b"late"))


def fake_xl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    script = tmp_path / "xl"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    monkeypatch.setenv("RELOCD_XL", str(script))


def test_restore_receiver_feeds_xl_a_whole_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_xl(tmp_path, monkeypatch, f'echo "$@" >{tmp_path}/argv; cat >{tmp_path}/image')
    receiver = stream.XlRestoreReceiver({"c_info": {"name": "d--incoming"}}, tmp_path / "xl.log")
    for chunk in (b"libxenguest ", b"stream"):
        receiver.feed(chunk)
    receiver.finish(timeout=10)
    image = (tmp_path / "image").read_bytes()
    prefix = xlimage.read_prefix(image)
    assert prefix.config == {"c_info": {"name": "d--incoming"}}
    assert image[prefix.size :] == b"libxenguest stream" + xlimage.image_suffix()
    assert (tmp_path / "argv").read_text().split() == ["restore", "-p", "/dev/stdin"]


def test_restore_receiver_reports_xl_failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_xl(tmp_path, monkeypatch, 'head -c 8 >/dev/null; echo "libxl: cannot (re-)build domain: -3" >&2; exit 1')
    receiver = stream.XlRestoreReceiver(None, tmp_path / "xl.log")
    with pytest.raises(DriverError) as failed:
        for _ in range(64):
            receiver.feed(bytes(1 << 20))  # far more than a pipe holds: xl's exit must show
    assert failed.value.message == "xen driver: xl restore failed: libxl: cannot (re-)build domain: -3"
    receiver.abort()


def test_xl_image_prefix_is_what_xl_restore_reads() -> None:
    config = {"c_info": {"name": "domu--incoming", "type": "pv"}, "b_info": {"max_memkb": 131072}}
    prefix = xlimage.image_prefix(config)
    assert prefix[:32] == b"Xen saved domain, xl format\n \0 \r"
    assert prefix[32:48] == bytes.fromhex("04030201 03000000 00000000") + prefix[44:48]
    parsed = xlimage.read_prefix(prefix + b"<libxenguest stream>")
    assert parsed.config == config and parsed.mandatory_flags == 3
    assert (parsed.libxl_version, parsed.first_record, parsed.size) == (2, xlimage.REC_LIBXC_CONTEXT, len(prefix))
    assert prefix[-24:-8] == b"LibxlFmt" + bytes.fromhex("00000002 00000000")
    assert xlimage.image_suffix() == bytes(8)
    assert xlimage.libxl_record(5, b"abc") == bytes.fromhex("05000000 03000000") + b"abc" + bytes(5)
    with pytest.raises(DriverError, match="bad magic"):
        xlimage.read_prefix(b"LinuxGuestRecord" + bytes(64))


def test_featureset_words_name_cpuid_bits() -> None:
    words = [0] * 12
    words[0] = 1 << 26  # 1.edx: sse2
    words[1] = 1 << 20  # 1.ecx: sse4_2
    words[2] = 1 << 29  # e1.edx: lm
    words[5] = 1 << 5  # 7.ebx: avx2
    words[4] = 0xFFFFFFFF  # 0xd:1.eax: not named, must not leak in
    assert featureset_names(words) == frozenset({"sse2", "sse4_2", "lm", "avx2"})


LIBXL_JSON = {
    "c_info": {"type": "pv", "name": "web1", "uuid": "3cd56214-e8ae-4f94-87f4-c921f90b19d6"},
    "b_info": {
        "max_vcpus": 2,
        "max_memkb": 262144,
        "target_memkb": 262144,
        "type.pv": {"kernel": "/boot/vmlinuz", "ramdisk": "/boot/initrd", "cmdline": "console=hvc0"},
    },
    "nics": [{"devid": 0, "mac": "00:16:3e:01:02:03", "bridge": "xenbr0", "ip": "10.0.0.5"}],
}


def test_libxl_json_to_config_and_back_to_xl() -> None:
    cfg = xencfg.from_libxl_json(LIBXL_JSON)
    assert (cfg.name, cfg.memory_mib, cfg.vcpus, cfg.driver) == ("web1", 256, 2, "xen")
    assert cfg.vifs == (Vif(mac="00:16:3e:01:02:03", ips=("10.0.0.5",), bridge="xenbr0"),)
    text = xencfg.to_xl_config(cfg)
    assert 'kernel = "/boot/vmlinuz"' in text and 'extra = "console=hvc0"' in text
    assert 'vif = ["mac=00:16:3e:01:02:03,bridge=xenbr0,ip=10.0.0.5"]' in text
    assert "memory = 256" in text and f'uuid = "{cfg.uuid}"' in text


def test_libxl_json_travels_in_the_config_and_is_renamed_for_the_target() -> None:
    cfg = xencfg.from_libxl_json(LIBXL_JSON)
    carried = xencfg.libxl_json_for(cfg, "web1--incoming")
    assert carried is not None and carried["c_info"]["name"] == "web1--incoming"
    assert carried["c_info"]["uuid"] == cfg.uuid and carried["b_info"] == LIBXL_JSON["b_info"]
    source_c_info = LIBXL_JSON["c_info"]
    assert isinstance(source_c_info, dict) and source_c_info["name"] == "web1"  # the source's dict is untouched
    bare = cfg.model_copy(update={"extra": {k: v for k, v in cfg.extra.items() if k != xencfg.LIBXL_JSON}})
    assert xencfg.libxl_json_for(bare, "x") is None
    assert xencfg.LIBXL_JSON not in xencfg.to_xl_config(cfg)


#: ``xl list -l`` of the lab's PVH domU (tests/xenlab/pvh.cfg), trimmed: the boot triple sits in b_info itself.
PVH_LIBXL_JSON = {
    "c_info": {"type": "pvh", "name": "pvh", "uuid": "0b5f3e4a-9f7e-4f7a-8a43-2f6f2f1e7c11"},
    "b_info": {
        "max_vcpus": 1,
        "max_memkb": 131072,
        "target_memkb": 131072,
        "kernel": "/var/lib/xen/domu-vmlinuz",
        "ramdisk": "/var/lib/xen/domu-initrd.img",
        "cmdline": "console=hvc0 quiet",
        "type.pvh": {"pvshim": "False"},
        "arch_x86": {"msr_relaxed": "False"},
    },
}


def test_pvh_config_keeps_its_type_and_boot_triple() -> None:
    cfg = xencfg.from_libxl_json(PVH_LIBXL_JSON)
    assert cfg.extra[xencfg.TYPE] == "pvh" and (cfg.memory_mib, cfg.vcpus) == (128, 1)
    assert cfg.extra[xencfg.KERNEL] == "/var/lib/xen/domu-vmlinuz"
    assert cfg.extra[xencfg.RAMDISK] == "/var/lib/xen/domu-initrd.img"
    assert cfg.extra[xencfg.CMDLINE] == "console=hvc0 quiet"
    carried = xencfg.libxl_json_for(cfg, "pvh--incoming")  # what the target's xl restore builds from
    assert carried is not None and carried["c_info"]["type"] == "pvh" and carried["b_info"] == PVH_LIBXL_JSON["b_info"]
    bare = cfg.model_copy(update={"extra": {k: v for k, v in cfg.extra.items() if k != xencfg.LIBXL_JSON}})
    text = xencfg.to_xl_config(bare)  # a target without libxl's JSON: the xl config must say pvh too
    assert text.startswith('type = "pvh"\n') and 'kernel = "/var/lib/xen/domu-vmlinuz"' in text


def test_disks_from_libxl_json_are_local_paths_only() -> None:
    """What RESERVE carries for the target to open: pdev_path of each disk, not a script's target nor an empty CD."""
    with_disks = {
        **LIBXL_JSON,
        "disks": [
            {"pdev_path": "/dev/vg0/web1", "vdev": "xvda", "backend": "phy", "format": "raw"},
            {"pdev_path": "/srv/xen/web1-data.qcow2", "vdev": "xvdb", "backend": "qdisk", "format": "qcow2"},
            {"pdev_path": "iqn.2001-05.com.example:web1", "vdev": "xvdc", "script": "block-iscsi"},
            {"vdev": "hdc", "is_cdrom": 1},
        ],
    }
    assert xencfg.from_libxl_json(with_disks).disks == ("/dev/vg0/web1", "/srv/xen/web1-data.qcow2")
    assert xencfg.from_libxl_json(LIBXL_JSON).disks == ()


@pytest.mark.parametrize(
    ("flags", "emulation", "kind"),
    [(0, 0, "pv"), (libxc.DOMINF_HVM, libxc.X86_EMU_LAPIC, "pvh"), (libxc.DOMINF_HVM, 0x3FF, "hvm")],
)
def test_guest_type_from_the_hypervisor(flags: int, emulation: int, kind: str) -> None:
    """Xen flags PVH as HVM; only the emulated devices (the local APIC alone) tell them apart."""
    info = libxc.DomInfo(1, "0b5f3e4a-9f7e-4f7a-8a43-2f6f2f1e7c11", flags, 0, 0, 0, 1, 0, emulation)
    assert info.guest_type == kind


def test_xl_config_text_keeps_its_lines_but_not_identity() -> None:
    given = 'name = "old"\nmemory = 64\nkernel = "/k"\non_crash = "preserve"\n'
    cfg = DomainConfig(name="new", memory_mib=128, driver="xen", extra={xencfg.XL_CONFIG: given})
    text = xencfg.to_xl_config(cfg)
    assert 'name = "old"' not in text and "memory = 64" not in text
    assert 'kernel = "/k"' in text and 'on_crash = "preserve"' in text and 'name = "new"' in text


def test_config_without_kernel_is_refused() -> None:
    with pytest.raises(DriverError, match="no xl config and no kernel"):
        xencfg.to_xl_config(DomainConfig(name="x", memory_mib=64, driver="xen"))


class ListedXenDomain:
    """A xen domain as the driver lists it: the cheap config, the whole one on request."""

    transfer = "stream"

    def __init__(self, listed: DomainConfig, whole: DomainConfig) -> None:
        self.config, self._whole = listed, whole

    async def read_config(self) -> DomainConfig:
        self.config = self._whole
        return self._whole


async def test_config_carried_for_a_stream_domain_is_the_whole_one() -> None:
    """Found in the lab: CONFIG carried the xenstore listing, and the target's xl restore had no kernel."""
    whole = xencfg.from_libxl_json(LIBXL_JSON)
    listed = DomainConfig(name="web1", uuid=whole.uuid, memory_mib=256, driver="xen", extra={xencfg.TYPE: "pv"})
    carried = await Domain.read_config(ListedXenDomain(listed, whole))  # type: ignore[arg-type]
    assert carried == listed, "the seam's default carries the listing"
    carried = await ListedXenDomain(listed, whole).read_config()  # what the engine calls (source.run)
    assert carried == whole and xencfg.libxl_json_for(carried, "web1--incoming") is not None


@pytest.mark.skipif(Path("/proc/xen/capabilities").exists(), reason="this host is a Xen domain")
async def test_driver_refuses_clearly_without_xen(tmp_path: Path) -> None:
    driver = load_driver("xen", tmp_path)  # lazy: loading never touches Xen
    assert driver.domains() == []
    with pytest.raises(DriverError) as refused:
        await driver.start()
    assert refused.value.message.startswith("xen driver: ") and "\n" not in refused.value.message


# -- the lab --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenLab]:
    image = image_or_skip()
    workdir = tmp_path_factory.mktemp("xenlab")
    lab = XenLab(image, workdir)
    try:
        lab.start(boot_timeout=600)
        lab.run("xl create -q /lab/xenlab/domu.cfg", timeout=180)
        # The domU's kernel boots in a few seconds of TCG time; wait for its counter.
        lab.run("until grep -q '^count 3' /var/log/xen/console/guest-domu.log; do sleep 1; done", timeout=180)
        yield lab
    finally:
        lab.close()


def last_count(lab: XenLab, name: str = "domu") -> int:
    """The domU's latest count, over every console log it has had.

    xenconsoled names a guest's log when it connects the console ring, so a
    copy restored under a temporary name (``domu--incoming``, as ``xl
    migrate-receive`` and relocd use) logs to that name's file after the move.
    """
    out = lab.run(f"cat /var/log/xen/console/guest-{name}*.log | tr -d '\\r' | grep '^count ' | sort -k2n | tail -1")
    m = re.search(r"count (\d+)", out)
    assert m, out
    return int(m.group(1))


def restarts(lab: XenLab, name: str = "domu") -> int:
    """How often the domU's counter started at 1 (more than once: it rebooted instead of moving)."""
    out = lab.run(f"cat /var/log/xen/console/guest-{name}*.log | tr -d '\\r' | grep -c '^count 1$' || true")
    return int(out.strip())


def domu_copies(lab: XenLab, name: str = "domu") -> list[str]:
    return [line.split()[0] for line in lab.run("xl list").splitlines() if line.startswith(name)]


@pytest.mark.system
def test_driver_operations_in_the_lab(lab: XenLab) -> None:
    out = lab.run("cd /tmp && timeout 400 python3 /lab/xenlab/check_driver.py", timeout=450)
    m = re.search(r"^XENCHECK (.*)$", out, re.MULTILINE)
    assert m, out
    r = json.loads(m.group(1))
    # Capabilities come from Xen: dom0 is fixed at 1 GiB of the lab's 3 GiB.
    assert 1200 < r["caps"]["free_memory_mib"] < 2100
    assert r["caps"]["has_sse2"] and r["caps"]["max_vcpus"] == 2
    assert r["listed"] == [["domu", 128, 1, "running"]]
    assert r["config"]["extra"]["xen_kernel"] == "/var/lib/xen/domu-vmlinuz"
    assert r["config"]["extra"]["xen_type"] == "pv"
    assert r["paused_state"] == "paused" and r["resumed_state"] == "running"
    frozen_from, frozen_to = r["count_while_paused"]
    assert frozen_from == frozen_to, "the counter moved while the domain was paused"
    assert r["count_after_resume"] > frozen_to, "the counter did not go on after resume"
    assert "travel only in Xen's own save stream" in r["memory"]
    assert "domu-renamed" in r["after_rename"]
    name, domid, running, listed = r["created"]
    assert name == "domu2" and domid > 0 and running and listed == ["domu", "domu2"]
    assert r["after_destroy"] == ["Domain-0", "domu"]


@pytest.mark.system
def test_xl_migrate_to_localhost_reference(lab: XenLab) -> None:
    """Xen's own live migration in the lab: the reference relocd is compared with."""
    before = last_count(lab)
    lab.run("xl migrate -s '' domu 'xl migrate-receive' >/tmp/xl-migrate.log 2>&1", timeout=300)
    assert domu_copies(lab) == ["domu"]
    at_end = last_count(lab)  # the source is gone: only the new copy can count on
    lab.run("sleep 4")
    after = last_count(lab)
    assert at_end >= before and after >= at_end + 2, f"console stopped counting: {before} -> {at_end} -> {after}"
    assert restarts(lab) == 1, "the guest rebooted instead of moving"


@pytest.fixture(scope="module")
def stream_steps(lab: XenLab) -> dict[str, dict[str, Any]]:
    """check_stream.py's steps, in one dom0 run (importing relocd there takes 15 s of TCG)."""
    steps = ["xend-3", "downtime", "cancel", "cut", "nosuspend", "savefile", "seam", "badtarget",
             "relocdsave", "relocdsavefull", "xlsave"]  # fmt: skip
    out = lab.run(
        f"cd /tmp && timeout 900 python3 /lab/xenlab/check_stream.py {' '.join(steps)} 2>/tmp/stream.err", timeout=950
    )
    m = re.search(r"^XENSTREAM (.*)$", out, re.MULTILINE)
    assert m, out + lab.run("grep -v progress /tmp/stream.err | tail -30", check=False)
    return dict(zip(steps, json.loads(m.group(1)), strict=True))


def assert_one_copy_counting(step: dict[str, Any]) -> None:
    assert step["xl_list"] == ["Domain-0", "domu"], f"not exactly one copy: {step}"
    assert step["at_end"] >= step["before"], step
    assert step["after"] >= step["at_end"] + 2, f"the domU does not count on: {step}"
    assert step["ones"] == 1, "the guest rebooted"


@pytest.mark.system
def test_relocd_stream_moves_the_domu_within_dom0(stream_steps: dict[str, dict[str, Any]]) -> None:
    """xc_domain_save driven by relocd's policy, its stream restored by xl: twice, one policy each."""
    first, second = stream_steps["xend-3"], stream_steps["downtime"]
    for move in (first, second):
        report = move["move"]
        assert_one_copy_counting(move)
        assert move["domid_now"] == report["target_domid"] != report["source_domid"]
        rounds = report["rounds"]
        assert rounds[0]["round"] == 1 and rounds[0]["pages_sent"] == 32768  # 128 MiB, all of it first
        assert report["stream_bytes"] > 128 << 20
        assert all(r["stop_reason"] is None for r in rounds[:-1])
        assert rounds[-1]["stop_reason"] == report["stop_reason"]
    # relocd's policy made each decision: xend-3 ran exactly three rounds, downtime stopped on its own rule.
    assert [r["round"] for r in first["move"]["rounds"]] == [1, 2, 3]
    assert first["move"]["stop_reason"] == "max-iterations"
    assert first["move"]["policy_calls"] == 7
    assert second["move"]["stop_reason"] in ("downtime", "dirty-threshold", "no-progress")


@pytest.mark.system
def test_failed_stream_saves_leave_the_domu_running(stream_steps: dict[str, dict[str, Any]]) -> None:
    cancel, cut, nosuspend = stream_steps["cancel"], stream_steps["cut"], stream_steps["nosuspend"]
    assert cancel["error"] == (
        f"xen driver: xc_domain_save of domain {cancel['domid']} failed: precopy policy: cancelled by the operator"
    )
    assert not cancel["suspended"]
    assert cut["error"] == "xen driver: the stream's receiver failed: the receiver went away"
    assert cut["suspended"], "the cut came before the guest suspended: the resume path went untested"
    # A guest that never answers the suspend request (kept paused): the save gives up, withdraws the request.
    assert nosuspend["error"] == (
        f"xen driver: xc_domain_save of domain {nosuspend['domid']} failed: "
        "the guest did not answer the suspend request within 5s (request withdrawn; it runs on)"
    )
    assert not nosuspend["suspended"] and nosuspend["request_left"] in ("", None)
    for step in (cancel, cut, nosuspend):
        assert step["shutdown"] is False and step["domid_now"] == step["domid"]
        assert_one_copy_counting(step)


@pytest.mark.system
def test_stream_saved_to_an_xl_save_image_is_restored_by_xl(stream_steps: dict[str, dict[str, Any]]) -> None:
    step = stream_steps["savefile"]
    assert step["size"] > 128 << 20
    assert step["domid_now"] != step["domid"]
    assert_one_copy_counting(step)


@pytest.mark.system
def test_driver_stream_seam_moves_the_domu(stream_steps: dict[str, dict[str, Any]]) -> None:
    """XenDomain.send_stream into a bounded queue, XenDriver.receive_stream out of it: the engine's future seam."""
    step = stream_steps["seam"]
    assert step["prepared_paused"] == "paused"  # PREPARED: built by xl, not yet running
    assert step["target_domid"] == step["domid_now"] != step["domid"]
    assert step["listed"] == ["domu"]
    rounds = step["rounds"]
    assert rounds and rounds[-1]["stop_reason"] is not None
    assert step["progress"] == [[r["round"], r["dirty_pages"], r["stop_reason"]] for r in rounds]  # on_round saw each
    assert_one_copy_counting(step)


@pytest.mark.system
def test_target_refusing_the_stream_leaves_the_domu_running(stream_steps: dict[str, dict[str, Any]]) -> None:
    """xl restore on the target fails; the engine cancels the send: one copy, running on, same domid."""
    step = stream_steps["badtarget"]
    assert step["receive_error"].startswith("xen driver: xl restore failed: ") and "\n" not in step["receive_error"]
    assert step["send_outcome"] == "cancelled"
    assert step["state"] == "running" and step["listed"] == ["domu"]
    assert step["domid_now"] == step["domid"]
    assert_one_copy_counting(step)


def relocd_cli(lab: XenLab, daemon: str, args: str, timeout: float = 120) -> Any:
    """``relocd ARGS --json`` against daemon ``a`` or ``b`` in dom0; its JSON."""
    out = lab.run(f"python3 -m relocd {args} --json --control /run/relocd-{daemon}/control.sock", timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def daemons(lab: XenLab) -> Iterator[XenLab]:
    """relocd daemons a (127.0.0.1) and b (127.0.0.2) in the lab's dom0, for the rest of the module.

    Started once: importing relocd in dom0 takes a while under TCG.
    """
    lab.run("sh /lab/xenlab/relocd-daemons.sh start", timeout=400)
    try:
        yield lab
    finally:
        lab.run("sh /lab/xenlab/relocd-daemons.sh stop", timeout=120, check=False)


@pytest.mark.system
def test_relocd_migrate_between_two_daemons_in_dom0(daemons: XenLab) -> None:
    """Issue 7: `relocd migrate --live` moves the PV domU from one daemon to another in one dom0, and back."""
    lab = daemons
    for source, target, address in (("a", "b", "127.0.0.2"), ("b", "a", "127.0.0.1")):
        before = last_count(lab)
        result = relocd_cli(lab, source, f"migrate domu {address} --port 8002 --live", timeout=400)
        assert result["status"] == "completed", result
        rounds = result["rounds"]
        assert rounds and rounds[0]["pages_sent"] == 32768, result  # 128 MiB, all of it in round 1
        assert result["iterations"] == len(rounds) + 1  # the precopy rounds, then stop-and-copy
        assert result["stop_reason"] is not None and rounds[-1]["round"] == len(rounds)
        assert domu_copies(lab) == ["domu"], lab.run("xl list")
        at_end = last_count(lab)
        lab.run("sleep 4")
        after = last_count(lab)
        assert at_end >= before and after >= at_end + 2, f"console stopped counting: {before} -> {at_end} -> {after}"
        assert restarts(lab) == 1, "the guest rebooted instead of moving"
        listed = {d["name"]: d["state"] for d in relocd_cli(lab, target, "list")}
        assert listed.get("domu") == "running", listed


@pytest.mark.system
def test_relocd_save_and_restore_of_the_domu(stream_steps: dict[str, dict[str, Any]]) -> None:
    """Issue 7: relocd's save of a Xen PV domU to a relocd savefile (xm save: it goes), relocd's restore of it.

    Issue 14: first a save --checkpoint (xm save -c), after which the same domU runs on."""
    step = stream_steps["relocdsave"]
    checkpoint = step["checkpoint"]  # save --checkpoint: live, then the suspend cancelled; the guest runs on
    assert checkpoint["status"] == "completed" and checkpoint["checkpoint"], checkpoint
    assert checkpoint["iterations"] >= 2 and checkpoint["stream_bytes"] > 128 << 20, checkpoint
    assert 0 < checkpoint["pause_ms"] < 30_000, checkpoint
    assert step["checkpoint_inspect"]["checkpoint"] is True and step["checkpoint_inspect"]["digest_ok"] is True
    assert step["running_after_checkpoint"] == "running" and step["domid_after_checkpoint"] == step["domid"]
    assert step["count_after_checkpoint"] >= step["count_at_checkpoint"] + 2, "the guest stopped after its checkpoint"
    save = step["save"]
    assert save["status"] == "completed" and not save["checkpoint"], save
    assert save["stream_bytes"] > 128 << 20 and step["size"] > save["stream_bytes"]  # all of it, in STREAM records
    assert "domu" not in step["after_save"] and step["partials"] == []
    info = step["inspect"]
    assert info["digest_ok"] is True and info["transfer"] == "stream", info
    assert (info["name"], info["driver"], info["memory_mib"]) == ("domu", "xen", 128)
    assert step["restore"]["domain"] == "domu"
    assert step["restore"]["details"]["stream_bytes"] == save["stream_bytes"]
    assert "a domain named domu already exists" in step["second_restore"]
    assert step["left_over"] == {"reservations": 0, "incoming": 0}
    assert step["listed"] == ["domu"] and step["state"] == "running"
    assert step["domid_now"] != step["domid"]
    assert_one_copy_counting(step)


@pytest.mark.system
def test_relocd_save_onto_a_full_disk_leaves_the_domu_running(stream_steps: dict[str, dict[str, Any]]) -> None:
    """No space left in the middle of the stream, with the guest suspended: no file, the same domU runs on."""
    step = stream_steps["relocdsavefull"]
    assert step["error"] == "cannot write /run/relocd-full/domu.save: No space left on device", step["error"]
    assert step["left"] == [], "a partial file was left behind"
    assert step["shutdown"] is False and step["state"] == "running"
    assert step["domid_now"] == step["domid"]
    assert_one_copy_counting(step)


@pytest.mark.system
def test_xl_save_image_restored_by_relocd(stream_steps: dict[str, dict[str, Any]]) -> None:
    """Issue 7's extra: `relocd restore` of a file `xl save` wrote."""
    step = stream_steps["xlsave"]
    assert "domu" not in step["after_save"]
    info = step["inspect"]
    assert info["format"] == "an xl save image" and info["digest_ok"] is None, info
    assert (info["name"], info["driver"], info["memory_mib"]) == ("domu", "xen", 128)
    assert info["stream_bytes"] > 128 << 20
    restored = step["restore"]
    assert restored["domain"] == "domu" and restored["details"]["format"] == "an xl save image", restored
    assert "a domain named domu already exists" in step["second_restore"]
    assert step["left_over"] == {"reservations": 0, "incoming": 0}
    assert step["listed"] == ["domu"] and step["state"] == "running"
    assert step["domid_now"] != step["domid"]
    assert_one_copy_counting(step)


# -- PVH (the SVM CPU model gives the nested Xen hvm and hap) ---------------------


def guest_type(lab: XenLab, name: str) -> str:
    """libxl's type of domain ``name``, as its config says (what the target was built as)."""
    out = lab.run(f"xl list -l {name}")
    return str(json.loads(out[out.index("[") :])[0]["config"]["c_info"]["type"])


@pytest.fixture(scope="module")
def pvh_lab(daemons: XenLab) -> Iterator[XenLab]:
    """The module's lab with a PVH domU ``pvh`` counting on its console, and relocd daemons a and b."""
    lab = daemons
    caps = lab.run("xl info | grep virt_caps").strip()
    if "hvm" not in caps.split(":", 1)[-1]:
        if os.environ.get("RELOCD_XENLAB_CPU"):
            pytest.skip(f"RELOCD_XENLAB_CPU's model gives Xen no HVM container for PVH ({caps})")
        pytest.fail(f"the lab's default CPU model gave Xen no HVM container ({caps})", pytrace=False)
    lab.run("xl create -q /lab/xenlab/pvh.cfg", timeout=180)
    lab.run("until grep -q '^count 3' /var/log/xen/console/guest-pvh.log; do sleep 1; done", timeout=180)
    try:
        yield lab
    finally:
        lab.run("for d in $(xl list | awk '/^pvh/ {print $2}'); do xl destroy $d; done", timeout=120, check=False)


WATCH = "/tmp/pvh-watch"


def watch_copies(lab: XenLab) -> None:
    """Sample ``xl list``'s pvh lines in dom0 every 0.5 s until ``copies_seen``."""
    lab.run(
        f"(while :; do xl list 2>&1 | grep '^pvh'; echo --; sleep 0.5; done) >{WATCH}.log 2>&1 & echo $! >{WATCH}.pid"
    )


def copies_seen(lab: XenLab) -> list[list[tuple[str, int, str]]]:
    """Stop the sampler; each sample's (name, domid, state) of every pvh copy."""
    lab.run(f"kill $(cat {WATCH}.pid); sleep 0.5")
    samples: list[list[tuple[str, int, str]]] = [[]]
    for line in lab.run(f"cat {WATCH}.log").splitlines():
        if line.strip() == "--":
            samples.append([])
        elif line.startswith("pvh") and len(line.split()) >= 5:
            name, domid, _mem, _vcpus, state = line.split()[:5]
            samples[-1].append((name, int(domid), state))
    return [s for s in samples[:-1]]


def assert_handoff_kept_one_copy(samples: list[list[tuple[str, int, str]]], source_domid: int) -> None:
    """Never no copy; the source's copy went only once the target's ran under the real name."""
    assert len(samples) >= 5, samples
    for sample in samples:
        assert sample, f"a moment with no pvh copy at all: {samples}"
        if all(domid != source_domid for _, domid, _ in sample):
            assert [(n, "p" in st) for n, _, st in sample] == [("pvh", False)], f"source gone too early: {sample}"
    assert all(domid != source_domid for _, domid, _ in samples[-1]), "the source's copy was never destroyed"


def pvh_domid(lab: XenLab) -> int:
    return int(lab.run("xl domid pvh").strip().splitlines()[-1])


@pytest.mark.system
def test_relocd_moves_a_pvh_domu_live_and_back_non_live(pvh_lab: XenLab) -> None:
    """Issue 14: relocd's stream path carries a PVH guest (HVM_CONTEXT, HVM_PARAMS): live a -> b, non-live b -> a."""
    lab = pvh_lab
    assert guest_type(lab, "pvh") == "pvh"
    for source, target, address, live in (("a", "b", "127.0.0.2", True), ("b", "a", "127.0.0.1", False)):
        before, source_domid = last_count(lab, "pvh"), pvh_domid(lab)
        watch_copies(lab)
        try:
            # TCG on shared cores: round 1 walks the PVH guest's whole physical map (1M frames): 40-320 s seen
            result = relocd_cli(lab, source, f"migrate pvh {address} --port 8002" + " --live" * live, timeout=900)
        finally:
            samples = copies_seen(lab)
        assert result["status"] == "completed" and result["live"] is live, result
        rounds = result["rounds"]
        if live:  # an HVM stream's p2m spans the guest's whole physical map: at least its 32768 pages
            assert rounds and rounds[0]["pages_sent"] >= 32768, result
            assert result["iterations"] == len(rounds) + 1 and result["stop_reason"] is not None, result
        else:
            assert rounds == [] and result["iterations"] == 1, result
        assert_handoff_kept_one_copy(samples, source_domid)
        assert domu_copies(lab, "pvh") == ["pvh"], lab.run("xl list")
        assert guest_type(lab, "pvh") == "pvh", "the target did not build a PVH guest"
        at_end = last_count(lab, "pvh")
        lab.run("sleep 4")
        after = last_count(lab, "pvh")
        assert at_end >= before and after >= at_end + 2, f"console stopped counting: {before} -> {at_end} -> {after}"
        assert restarts(lab, "pvh") == 1, "the guest rebooted instead of moving"
        listed = {d["name"]: d["state"] for d in relocd_cli(lab, target, "list")}
        assert listed.get("pvh") == "running", listed


@pytest.mark.system
def test_relocd_save_and_restore_of_a_pvh_domu(pvh_lab: XenLab) -> None:
    """Issue 14: `relocd save --checkpoint` of the PVH domU (it runs on), `relocd save` (it goes), `relocd restore`."""
    lab = pvh_lab
    domid = pvh_domid(lab)
    # save --checkpoint first: libxenguest's live HVM-format save, then xc_domain_resume(fast) of a PVH guest
    checkpoint = relocd_cli(lab, "a", "save pvh /var/tmp/pvh.checkpoint --checkpoint", timeout=900)
    assert checkpoint["status"] == "completed" and checkpoint["checkpoint"], checkpoint
    assert pvh_domid(lab) == domid and domu_copies(lab, "pvh") == ["pvh"]
    at_checkpoint = last_count(lab, "pvh")
    lab.run("sleep 3; rm -f /var/tmp/pvh.checkpoint")
    assert last_count(lab, "pvh") >= at_checkpoint + 2, "the PVH guest stopped after its checkpoint"
    before = last_count(lab, "pvh")
    lab.run("rm -f /var/tmp/pvh.save")
    saved = relocd_cli(lab, "a", "save pvh /var/tmp/pvh.save", timeout=900)
    assert saved["status"] == "completed", saved
    assert domu_copies(lab, "pvh") == [], "the saved domain is still there"
    info = relocd_cli(lab, "a", "inspect /var/tmp/pvh.save", timeout=200)
    assert info["digest_ok"] is True and (info["name"], info["driver"], info["memory_mib"]) == ("pvh", "xen", 128), info
    restored = relocd_cli(lab, "a", "restore /var/tmp/pvh.save", timeout=900)
    assert restored["domain"] == "pvh", restored
    assert domu_copies(lab, "pvh") == ["pvh"] and pvh_domid(lab) != domid
    assert guest_type(lab, "pvh") == "pvh"
    lab.run("test -s /var/tmp/pvh.save")  # a savefile stays intact after a restore
    at_end = last_count(lab, "pvh")
    lab.run("sleep 4")
    after = last_count(lab, "pvh")
    assert at_end >= before and after >= at_end + 2, f"console stopped counting: {before} -> {at_end} -> {after}"
    assert restarts(lab, "pvh") == 1, "the guest rebooted instead of being restored"
    listed = {d["name"]: d["state"] for d in relocd_cli(lab, "a", "list")}
    assert listed.get("pvh") == "running", listed
    lab.run("rm -f /var/tmp/pvh.save")


# -- disks checked at RESERVE --------------------------------------------------------


@pytest.mark.system
def test_move_refused_for_a_disk_the_target_cannot_open(daemons: XenLab) -> None:
    """Issue 14: daemon c, in a mount namespace where the domU's disk is not there, refuses the move at RESERVE."""
    lab = daemons
    lab.run(
        "modprobe loop 2>/dev/null; mkdir -p /var/tmp/relocd-disks && truncate -s 16M /var/tmp/diskd.img"
        " && dev=$(losetup -f --show /var/tmp/diskd.img) && test -b \"$dev\""
        " && ln -sfn \"$dev\" /var/tmp/relocd-disks/diskd"
    )
    try:
        lab.run("xl create -q /lab/xenlab/diskd.cfg", timeout=180)
        domid = int(lab.run("xl domid diskd").strip().splitlines()[-1])
        lab.run(
            "RELOCD_DAEMON_WRAP='sh /lab/xenlab/hide-disks.sh /var/tmp/relocd-disks'"
            " sh /lab/xenlab/relocd-daemons.sh start-one c 127.0.0.3",
            timeout=400,
        )
        out = lab.run(
            "python3 -m relocd migrate diskd 127.0.0.3 --port 8002 --live --json"
            " --control /run/relocd-a/control.sock; echo exit=$?",
            timeout=300,
        )
        result = json.loads(out[out.index("{") : out.rindex("}") + 1])
        assert "exit=1" in out, out
        assert result["status"] == "failed", result
        assert result["error"] == (
            "target refused: domain diskd needs disks this host cannot open:"
            " /var/tmp/relocd-disks/diskd (No such file or directory)"
        ), result  # the source saw the disk (it built the domU from it); daemon c does not
        assert result["pages_sent"] == 0 and result["bytes_sent"] == 0, result  # refused before a byte moved
        state = lab.run("xl list diskd").splitlines()[-1].split()
        assert state[0] == "diskd" and int(state[1]) == domid and "s" not in state[4], state  # same copy, not suspended
        assert domu_copies(lab, "diskd") == ["diskd"]
    finally:
        lab.run("[ -f /run/relocd-c/pid ] && kill $(cat /run/relocd-c/pid); rm -f /run/relocd-c/pid", check=False)
        lab.run("xl destroy diskd", timeout=120, check=False)
        lab.run(
            "losetup -d $(readlink /var/tmp/relocd-disks/diskd); rm -rf /var/tmp/relocd-disks /var/tmp/diskd.img",
            check=False,
        )
