"""Run inside the lab's dom0: move the domU through relocd's stream path (xc_domain_save -> xl restore).

Prints one JSON object (``XENSTREAM {...}``) for the host-side system test:
the move's report (every precopy round with relocd's decision), the console
counter before and after, and ``xl list``'s names.  Expects ``domu`` running.

    python3 check_stream.py xend-3 downtime    # one move per policy named, in order
    python3 check_stream.py cancel cut nosuspend  # failed saves: the domU must run on
    python3 check_stream.py savefile           # save to an xl save image, destroy, xl restore
    python3 check_stream.py seam               # a move through XenDomain.send_stream / XenDriver.receive_stream
    python3 check_stream.py badtarget          # the same, xl restore refusing: the domU must run on
    python3 check_stream.py relocdsave         # relocd's save --checkpoint (runs on), then a save (domU gone), relocd's restore
    python3 check_stream.py relocdsavefull     # relocd's save onto a full filesystem: the domU must run on
    python3 check_stream.py xlsave             # xl save, then relocd's restore of xl's image

``cancel``: relocd's policy cancels in round 1 (ABORT).  ``cut``: the
stream's receiver dies once the guest has suspended; relocd resumes it.
``nosuspend``: the guest never answers the suspend request (it is kept
paused with ``xl pause``; the timeout is cut to 5 s for the lab): the save
fails, the request is withdrawn, and once unpaused the guest runs on.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from relocd.drivers import DomainConfig, load_driver
from relocd.drivers.xen import XenDomain, XenDriver, xl
from relocd.drivers.xen.guestsave import GuestSaver
from relocd.drivers.xen.libxc import XenCtrl, XenStore
from relocd.drivers.xen.precopy import RoundDecision
from relocd.drivers.xen.stream import move_within_host, save_to_file, send_stream
from relocd.engine.policy import DowntimePolicy, PrecopyPolicy, RoundStats, XendPolicy
from relocd.engine.reservation import ReservationTable
from relocd.engine.savefile import inspect_savefile, restore_savefile, save_domain
from relocd.engine.target import TargetContext
from relocd.errors import DriverError, RelocdError

CONSOLE_LOGS = Path("/var/log/xen/console")


def xl_names() -> list[str]:
    out = subprocess.run(["xl", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]


def counts() -> dict[str, list[int]]:
    """Every guest console log's counter values, by file name."""
    found: dict[str, list[int]] = {}
    for log in sorted(CONSOLE_LOGS.glob("guest-*.log")):
        text = log.read_text(errors="replace")
        found[log.name] = [int(n) for n in re.findall(r"^count (\d+)\r?$", text, re.MULTILINE)]
    return found


def latest(seen: dict[str, list[int]]) -> int:
    return max((c[-1] for c in seen.values() if c), default=0)


def make_policy(name: str) -> PrecopyPolicy:
    if name == "xend-3":
        # Three rounds whatever the dirty set: shows relocd deciding round by round.
        return XendPolicy(max_iterations=3, dirty_threshold=0)
    return DowntimePolicy()


def domid_of(name: str) -> int:
    return int(subprocess.run(["xl", "domid", name], capture_output=True, text=True, check=True).stdout)


async def move_once(policy_name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"policy": policy_name}
    work = Path("/run/relocd-stream")
    work.mkdir(parents=True, exist_ok=True)
    out["before"] = latest(counts())
    t0 = time.monotonic()
    out["move"] = await move_within_host("domu", make_policy(policy_name), work)
    out["move_s"] = round(time.monotonic() - t0, 2)
    out["xl_list"] = xl_names()
    out["domid_now"] = domid_of("domu")
    out["at_end"] = latest(counts())  # the source's last count, or the new copy's first
    await asyncio.sleep(4)
    seen = counts()
    out["after"] = latest(seen)
    out["ones"] = sum(c.count(1) for c in seen.values())
    out["logs"] = {name: (c[0], c[-1], len(c)) for name, c in seen.items() if c}
    return out


class CancellingPolicy:
    """An operator's cancel, arriving while relocd's policy is asked about round 1."""

    def should_stop(self, stats: RoundStats) -> str | None:
        raise DriverError("cancelled by the operator")

    def expected_downtime_ms(self, stats: RoundStats) -> float | None:
        return None


async def after_effects(out: dict[str, Any]) -> dict[str, Any]:
    """One copy? Counting on, without a restart?"""
    out["xl_list"] = xl_names()
    out["domid_now"] = domid_of("domu")
    out["at_end"] = latest(counts())
    await asyncio.sleep(4)
    seen = counts()
    out["after"] = latest(seen)
    out["ones"] = sum(c.count(1) for c in seen.values())
    return out


async def failed_save(kind: str) -> dict[str, Any]:
    ctrl, store = XenCtrl(), XenStore()
    domid = domid_of("domu")
    saver = GuestSaver(ctrl, store, suspend_timeout=5.0 if kind == "nosuspend" else 60.0)
    out: dict[str, Any] = {"kind": kind, "domid": domid, "before": latest(counts())}

    def sink(chunk: bytes) -> None:
        if kind == "cut" and saver.suspended_at is not None:
            raise BrokenPipeError("the receiver went away")

    policy = CancellingPolicy() if kind == "cancel" else DowntimePolicy()
    if kind == "nosuspend":
        await xl.run_xl("pause", "domu")  # a guest that cannot answer
    try:
        await asyncio.to_thread(send_stream, saver, domid, sink, policy, live=kind != "nosuspend")
        out["error"] = None
    except DriverError as exc:
        out["error"] = exc.message
    if kind == "nosuspend":
        out["request_left"] = store.read(f"/local/domain/{domid}/control/shutdown")
        await xl.run_xl("unpause", "domu")
    out["suspended"] = saver.suspended_at is not None
    info = ctrl.domain(domid)
    out["shutdown"] = info.shutdown if info else None
    store.close()
    ctrl.close()
    return await after_effects(out)


async def savefile() -> dict[str, Any]:
    ctrl, store = XenCtrl(), XenStore()
    domid = domid_of("domu")
    out: dict[str, Any] = {"kind": "savefile", "domid": domid, "before": latest(counts())}
    path = Path("/var/tmp/domu.xlsave")
    t0 = time.monotonic()
    await asyncio.to_thread(save_to_file, GuestSaver(ctrl, store), domid, await xl.domain_config_json(domid), path)
    out["save_s"] = round(time.monotonic() - t0, 2)
    out["size"] = path.stat().st_size
    store.close()
    ctrl.close()
    await xl.destroy(domid)
    t0 = time.monotonic()
    await xl.run_xl("restore", str(path))
    out["restore_s"] = round(time.monotonic() - t0, 2)
    path.unlink()
    return await after_effects(out)


async def started_driver(state_dir: str = "/run/relocd-save") -> XenDriver:
    driver = load_driver("xen", Path(state_dir))
    assert isinstance(driver, XenDriver)
    await driver.start()
    return driver


async def seam_source() -> tuple[XenDriver, XenDomain, DomainConfig]:
    """The seam steps' driver, the running domU as the source, and its whole config."""
    driver = await started_driver("/run/relocd-seam")
    source = driver.lookup("domu")
    assert isinstance(source, XenDomain)
    return driver, source, await source.read_config()


async def seam_move() -> dict[str, Any]:
    """Source and target halves joined by a bounded queue, as relocd's transport would join them."""
    driver, source, config = await seam_source()
    out: dict[str, Any] = {"kind": "seam", "domid": source.domid, "before": latest(counts())}
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
    progress: list[tuple[int, int, str | None]] = []

    async def on_round(r: RoundDecision) -> None:
        progress.append((r.round, r.dirty_pages, r.stop_reason))

    async def send() -> list[RoundDecision]:
        rounds = await source.send_stream(True, DowntimePolicy(), queue.put, on_round)
        await queue.put(None)
        return rounds

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    rounds, target = await asyncio.gather(send(), driver.receive_stream(config, chunks(), name="domu--incoming"))
    out["prepared_paused"] = target.state.value
    # GO, on one host: the source steps aside, the target takes the name and runs, the source goes.
    await source.rename("domu--migratedaway")
    await target.rename("domu")
    await target.resume()
    await source.destroy()
    out["rounds"] = [r.as_dict() for r in rounds]
    out["progress"] = progress
    out["target_domid"] = target.domid
    out["listed"] = [d.name for d in driver.domains()]
    await driver.close()
    return await after_effects(out)


async def seam_refused() -> dict[str, Any]:
    """The target's xl refuses the domain (an HVM config on this PV-only Xen): nothing moves, nothing is lost."""
    driver, source, config = await seam_source()
    libxl_json = json.loads(config.extra["libxl_json"])
    libxl_json["c_info"]["type"] = "hvm"
    bad = config.model_copy(update={"extra": {**config.extra, "libxl_json": json.dumps(libxl_json)}})
    out: dict[str, Any] = {"kind": "badtarget", "domid": source.domid, "before": latest(counts())}
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    sending = asyncio.create_task(source.send_stream(True, DowntimePolicy(), queue.put))
    try:
        await driver.receive_stream(bad, chunks(), name="domu--incoming")
        out["receive_error"] = None
    except DriverError as exc:
        out["receive_error"] = exc.message
    sending.cancel()  # what the engine does when the target refuses
    try:
        await sending
        out["send_outcome"] = "finished"
    except asyncio.CancelledError:
        out["send_outcome"] = "cancelled"
    out["state"] = source.state.value
    out["listed"] = [d.name for d in driver.domains()]
    await driver.close()
    return await after_effects(out)


async def restore_with_relocd(driver: XenDriver, path: Path, out: dict[str, Any]) -> None:
    """relocd's restore of ``path`` (the engine's, as `relocd restore` runs it), then a second one (refused)."""
    tables = ReservationTable(120)
    ctx = TargetContext(drivers={"xen": driver}, reservations=tables, journal=None)  # type: ignore[arg-type]
    out["inspect"] = await inspect_savefile(str(path))
    t0 = time.monotonic()
    out["restore"] = (await restore_savefile(str(path), ctx)).to_json()
    out["restore_s"] = round(time.monotonic() - t0, 2)
    try:
        await restore_savefile(str(path), ctx)
        out["second_restore"] = None
    except RelocdError as exc:
        out["second_restore"] = exc.message
    out["left_over"] = {"reservations": len(ctx.reservations.all()), "incoming": len(ctx.incoming)}
    out["listed"] = [d.name for d in driver.domains()]
    out["state"] = next((d.state.value for d in driver.domains() if d.name == "domu"), None)


async def relocd_save() -> dict[str, Any]:
    """relocd's save of the running domU to a relocd savefile (xm save: the domU goes), then relocd's restore."""
    driver = await started_driver()
    dom = driver.lookup("domu")
    assert isinstance(dom, XenDomain)
    out: dict[str, Any] = {"kind": "relocdsave", "domid": dom.domid, "before": latest(counts())}
    path = Path("/var/tmp/domu.relocd-save")
    # save --checkpoint (xl save -c): a live save, then the suspend is cancelled and the guest runs on.
    checkpoint = Path("/var/tmp/domu.relocd-checkpoint")
    t0 = time.monotonic()
    out["checkpoint"] = (await save_domain(dom, checkpoint, checkpoint=True, policy=XendPolicy())).to_json()
    out["checkpoint_s"] = round(time.monotonic() - t0, 2)
    out["checkpoint_inspect"] = await inspect_savefile(str(checkpoint))
    out["running_after_checkpoint"] = dom.state.value
    out["domid_after_checkpoint"] = domid_of("domu")
    out["count_at_checkpoint"] = latest(counts())
    await asyncio.sleep(3)
    out["count_after_checkpoint"] = latest(counts())
    checkpoint.unlink()
    t0 = time.monotonic()
    out["save"] = (await save_domain(dom, path, checkpoint=False, policy=XendPolicy())).to_json()
    out["save_s"] = round(time.monotonic() - t0, 2)
    out["size"] = path.stat().st_size
    out["after_save"] = xl_names()
    out["partials"] = [p.name for p in path.parent.glob(f".{path.name}.*.partial")]
    await restore_with_relocd(driver, path, out)
    path.unlink()
    await driver.close()
    return await after_effects(out)


async def relocd_save_full() -> dict[str, Any]:
    """relocd's save onto a 16 MiB filesystem: no space in the middle of the stream (the domU is suspended)."""
    full = Path("/run/relocd-full")
    full.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(full)], check=True)
    try:
        driver = await started_driver()
        dom = driver.lookup("domu")
        assert isinstance(dom, XenDomain)
        out: dict[str, Any] = {"kind": "relocdsavefull", "domid": dom.domid, "before": latest(counts())}
        try:
            await save_domain(dom, full / "domu.save", checkpoint=False, policy=XendPolicy())
            out["error"] = None
        except RelocdError as exc:
            out["error"] = exc.message
        out["left"] = sorted(p.name for p in full.iterdir())
        info = dom._driver.ctrl.domain(dom.domid)
        out["shutdown"] = info.shutdown if info else None
        out["state"] = dom.state.value
        await driver.close()
    finally:
        subprocess.run(["umount", str(full)], check=False)
    return await after_effects(out)


async def xl_save_relocd_restore() -> dict[str, Any]:
    """`xl save domu FILE` (xl's own image; the domU goes), then relocd's restore of that file."""
    domid = domid_of("domu")
    out: dict[str, Any] = {"kind": "xlsave", "domid": domid, "before": latest(counts())}
    path = Path("/var/tmp/domu.xl-save")
    t0 = time.monotonic()
    await xl.run_xl("save", "domu", str(path))
    out["save_s"] = round(time.monotonic() - t0, 2)
    out["size"] = path.stat().st_size
    out["after_save"] = xl_names()
    driver = await started_driver()
    await restore_with_relocd(driver, path, out)
    path.unlink()
    await driver.close()
    return await after_effects(out)


async def main(steps: list[str]) -> list[dict[str, Any]]:
    results = []
    for step in steps:
        if step in ("cancel", "cut", "nosuspend"):
            results.append(await failed_save(step))
        elif step == "savefile":
            results.append(await savefile())
        elif step == "seam":
            results.append(await seam_move())
        elif step == "badtarget":
            results.append(await seam_refused())
        elif step == "relocdsave":
            results.append(await relocd_save())
        elif step == "relocdsavefull":
            results.append(await relocd_save_full())
        elif step == "xlsave":
            results.append(await xl_save_relocd_restore())
        else:
            results.append(await move_once(step))
    return results


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1:] or ["xend-3"]))
    print("XENSTREAM " + json.dumps(result), flush=True)
