"""Moving a Xen PV domain as a stream: libxenguest's save on one side, xl's restore on the other.

The prototype of docs/xen.md's "Way A", inside the driver package and not
yet behind the engine's seam:

* ``send_stream``: ``xc_domain_save`` (``guestsave.GuestSaver``) writes the
  domain's libxenguest stream into a pipe; a pump thread hands each chunk to
  a sink (relocd's transport, later) and counts the bytes, which is what the
  precopy policy's rounds are measured in.  relocd's ``PrecopyPolicy``
  answers every ``precopy_policy`` call (``precopy.PolicyBridge``).
* ``XlRestoreReceiver``: wraps the chunks as an xl save image
  (``xlimage``) around the domain's libxl JSON config and feeds them to
  ``xl restore -p``: Xen's own toolstack builds the domain, paused, with its
  devices, xenstore entries and console.
* ``move_within_host``: both ends in one dom0 (the lab's first proof), with
  xl migrate's handoff: incoming copy named ``NAME--incoming``, source renamed
  ``NAME--migratedaway``, target renamed and unpaused, source destroyed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any

from relocd.drivers.xen import xl, xlimage
from relocd.drivers.xen.guestsave import GuestSaver
from relocd.drivers.xen.libxc import XenCtrl, XenStore
from relocd.drivers.xen.precopy import PolicyBridge, RoundDecision
from relocd.engine.policy import PrecopyPolicy
from relocd.errors import DriverError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RESTORE_TIMEOUT_S = 300.0


def widen_pipe(fd: int) -> None:
    """Let a pipe hold a whole CHUNK (Linux's default is 64 KiB).

    libxenguest writes its stream in batches of up to 4 MiB; with the default
    size every read of the pump got at most 64 KiB, so each MiB of guest
    memory cost 16 records and 16 thread hops to the event loop and back (and
    as many to xl's stdin on the target).  Best effort: a system whose
    ``fs.pipe-max-size`` is lower keeps the default.
    """
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CHUNK)


class _Pump:
    """Reads the save pipe in its own thread and hands chunks to the sink."""

    def __init__(self, fd: int, sink: Callable[[bytes], object]) -> None:
        self.fd = fd
        self.sink = sink
        self.nbytes = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="xen-save-pump", daemon=True)

    def _run(self) -> None:
        try:
            while chunk := os.read(self.fd, CHUNK):
                self.sink(chunk)
                self.nbytes += len(chunk)
        except BaseException as exc:  # noqa: BLE001 - reported by send_stream
            self.error = exc
        finally:
            os.close(self.fd)  # a dead sink makes libxenguest's next write fail (EPIPE), not hang


class LoopCaller:
    """Runs coroutines on an event loop from a worker thread and waits for each; ``cut`` ends them all.

    The save's thread hands chunks to an async transport this way; a cancel
    must not leave that thread waiting on a send nobody will complete.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._inflight: set[concurrent.futures.Future[None]] = set()
        self._cut = False

    def call(self, coro: Coroutine[Any, Any, None]) -> None:
        with self._lock:
            if self._cut:
                coro.close()
                raise DriverError("xen driver: the stream was cancelled")
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._inflight.add(fut)
        try:
            fut.result()
        finally:
            with self._lock:
                self._inflight.discard(fut)

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            pending = list(self._inflight)
        for fut in pending:
            fut.cancel()


def send_stream(
    saver: GuestSaver,
    domid: int,
    sink: Callable[[bytes], object],
    policy: PrecopyPolicy | PolicyBridge | None,
    *,
    live: bool = True,
    on_round: Callable[[RoundDecision], None] | None = None,
) -> PolicyBridge | None:
    """Save domain ``domid`` into ``sink`` (blocking); returns with the domain suspended.

    ``policy`` may come ready-wrapped as a PolicyBridge (the caller then
    holds it to cancel; ``on_round`` is then the bridge's own).  On failure
    the domain is resumed (if it got as far as suspending) and DriverError
    says why.
    """
    rfd, wfd = os.pipe()
    widen_pipe(wfd)
    pump = _Pump(rfd, sink)
    if isinstance(policy, PolicyBridge):
        bridge: PolicyBridge | None = policy
    else:
        bridge = PolicyBridge(policy, on_round=on_round) if policy is not None else None
    if bridge is not None:
        bridge.count_bytes_with(lambda: pump.nbytes)
    pump.thread.start()
    failed: DriverError | None = None
    try:
        saver.save(domid, wfd, bridge, live=live)
    except DriverError as exc:
        failed = exc
    finally:
        os.close(wfd)
        pump.thread.join()
    if failed is None and pump.error is None:
        return bridge
    _resume_or_warn(saver, domid)
    if pump.error is not None:  # the cause; libxenguest only saw a broken pipe
        raise DriverError(f"xen driver: the stream's receiver failed: {pump.error}") from None
    assert failed is not None
    raise failed


def _resume_or_warn(saver: GuestSaver, domid: int) -> None:
    """Undo a suspend after a failed save; a failure here leaves the domain suspended, so say so."""
    try:
        saver.resume(domid)
    except DriverError as exc:
        log.error("xen driver: domain %d stays suspended: %s (xl destroy or a manual resume is needed)", domid, exc)


class XlRestoreReceiver:
    """Feeds an xl save image, built around a libxenguest stream, to ``xl restore -p``."""

    def __init__(self, config: dict[str, Any] | None, log_path: Path, *, config_file: Path | None = None) -> None:
        """``config``: libxl's JSON for the image; ``config_file``: an xl config file that overrides it."""
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in finish/abort
        self.bytes_fed = 0
        override = [str(config_file)] if config_file is not None else []
        try:
            self._proc = subprocess.Popen(
                [xl.xl_path(), "restore", "-p", *override, "/dev/stdin"],
                stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        except OSError as exc:
            self._log.close()
            raise DriverError(f"xen driver: cannot run xl: {exc}") from None
        assert self._proc.stdin is not None
        widen_pipe(self._proc.stdin.fileno())
        try:
            self.feed(xlimage.image_prefix(config))
        except DriverError:
            self.abort()
            raise

    def feed(self, chunk: bytes) -> None:
        """Pass one chunk on; DriverError with xl's last words if xl has gone."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(chunk)
            self._proc.stdin.flush()
        except OSError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)  # let xl finish its message
            raise DriverError(f"xen driver: xl restore failed: {self.last_log_line()}") from None
        self.bytes_fed += len(chunk)

    def finish(self, timeout: float = RESTORE_TIMEOUT_S) -> None:
        """End the image and wait for xl: the domain exists, paused, when this returns."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(xlimage.image_suffix())
            self._proc.stdin.close()
        except OSError:
            pass  # xl has exited: its status says why
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            raise DriverError(f"xen driver: xl restore did not finish within {timeout:.0f}s") from None
        self._log.close()
        if rc != 0:
            raise DriverError(f"xen driver: xl restore failed: {self.last_log_line()}")

    def exited(self) -> bool:
        return self._proc.poll() is not None

    def abort(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        self._log.close()

    def last_log_line(self) -> str:
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit status {self._proc.returncode}"


def save_to_file(
    saver: GuestSaver, domid: int, config: dict[str, Any], path: Path, policy: PrecopyPolicy | None = None
) -> PolicyBridge | None:
    """Write domain ``domid`` as an xl save image (what ``xl save`` writes; ``xl restore`` reads it).

    Non-live without a policy, live with one.  Returns with the domain
    suspended: the caller destroys it (as ``xl save`` does) or resumes it.
    """
    try:
        with open(path, "wb") as f:
            f.write(xlimage.image_prefix(config))
            bridge = send_stream(saver, domid, f.write, policy, live=policy is not None)
            f.write(xlimage.image_suffix())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return bridge


def _domid_of(name: str, store: XenStore, ctrl: XenCtrl) -> int | None:
    for info in ctrl.domains():
        if info.domid != 0 and not info.dying and store.read(f"/local/domain/{info.domid}/name") == name:
            return info.domid
    return None


async def move_within_host(
    name: str, policy: PrecopyPolicy, workdir: Path, *, live: bool = True
) -> dict[str, Any]:
    """Move domain ``name`` to a new copy of itself in this dom0, through relocd's stream path.

    Returns a report: rounds with relocd's decisions, bytes, timings, domids.
    """
    ctrl, store = XenCtrl(), XenStore()
    try:
        src = _domid_of(name, store, ctrl)
        if src is None:
            raise DriverError(f"xen driver: no domain named {name}")
        config = await xl.domain_config_json(src)
        incoming = f"{name}--incoming"
        config.setdefault("c_info", {})["name"] = incoming
        saver = GuestSaver(ctrl, store)
        receiver = XlRestoreReceiver(config, workdir / f"xl-restore-{name}.log")
        t0 = time.monotonic()
        try:
            bridge = await asyncio.to_thread(send_stream, saver, src, receiver.feed, policy, live=live)
            saved = time.monotonic()
            await asyncio.to_thread(receiver.finish)
        except DriverError as exc:
            xl_failed = receiver.exited()
            receiver.abort()
            dst = _domid_of(incoming, store, ctrl)
            if dst is not None:
                await xl.destroy(dst)
            _resume_or_warn(saver, src)
            if xl_failed and "xl restore" not in exc.message:
                raise DriverError(f"xen driver: xl restore failed: {receiver.last_log_line()}") from None
            raise
        prepared = time.monotonic()
        dst = _domid_of(incoming, store, ctrl)
        if dst is None:
            raise DriverError(f"xen driver: xl restored {incoming} but it is not listed")
        # GO, as xl migrate does it: the source steps aside, the target takes the name and runs.
        await xl.rename(src, f"{name}--migratedaway")
        await xl.rename(dst, name)
        ctrl.unpause(dst)
        resumed = time.monotonic()
        await xl.destroy(src)
        return {
            "source_domid": src,
            "target_domid": dst,
            "live": live,
            "rounds": [r.as_dict() for r in bridge.rounds] if bridge else [],
            "stop_reason": bridge.stop_reason if bridge else None,
            "policy_calls": bridge.calls if bridge else 0,
            "stream_bytes": receiver.bytes_fed,
            "save_s": round(saved - t0, 3),
            "restore_s": round(prepared - saved, 3),
            "downtime_s": round(resumed - saver.suspended_at, 3) if saver.suspended_at else None,
        }
    finally:
        store.close()
        ctrl.close()
