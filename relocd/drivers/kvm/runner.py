"""vCPU threads: run, pause, resume, and hold the workload's rate.

Each vCPU has a thread that loops on KVM_RUN (the ioctl releases the GIL).
Pausing sets ``immediate_exit`` in every kvm_run page and sends the vCPU
threads a signal, so a vCPU inside the guest leaves KVM_RUN with EINTR and
one about to enter returns at once.  Before a thread parks it re-enters
KVM_RUN once with ``immediate_exit`` set: KVM finishes the I/O exit it was
handling (the OUT's RIP advance) without running another guest instruction,
so the saved registers are complete.  ``pause()`` returns only when every
thread is parked outside KVM_RUN: from then on no guest write can land.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from typing import Any

from relocd.drivers.kvm import ioctls as k
from relocd.drivers.kvm.layout import PORT_AP_IDLE, PORT_BATCH, PORT_IDLE
from relocd.drivers.kvm.vm import GuestVm, Vcpu
from relocd.units import PAGE_SIZE

log = logging.getLogger("relocd.kvm.runner")

KICK_SIGNAL = signal.SIGUSR1
IDLE_TICK_S = 0.02  # how long an idle guest's OUT sleeps
AP_IDLE_S = 0.1
BATCH_PERIOD_S = 0.005  # target time between a busy guest's batches
MAX_BATCH_PAGES = 1024
_FATAL_EXITS = {
    k.KVM_EXIT_SHUTDOWN: "triple fault (shutdown)",
    k.KVM_EXIT_FAIL_ENTRY: "VM entry failed",
    k.KVM_EXIT_INTERNAL_ERROR: "KVM internal error",
    k.KVM_EXIT_UNKNOWN: "unknown exit",
    k.KVM_EXIT_EXCEPTION: "guest exception",
}


def install_kick_handler() -> None:
    """A no-op handler: the signal's only job is to make KVM_RUN return EINTR (main thread only)."""
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


def batch_pages(rate_bytes: int) -> int:
    """Pages per guest batch so that batches come every BATCH_PERIOD_S at this rate."""
    pages_per_s = rate_bytes / PAGE_SIZE
    return max(1, min(MAX_BATCH_PAGES, int(pages_per_s * BATCH_PERIOD_S)))


class Pacer:
    """Sleeps after each batch so the guest writes ``rate_bytes`` per second on average."""

    def __init__(self, rate_bytes: int) -> None:
        self.pages_per_s = rate_bytes / PAGE_SIZE
        self.restart()

    def restart(self) -> None:
        self._t0 = time.monotonic()
        self._pages = 0

    def delay_after(self, pages: int) -> float:
        if self.pages_per_s <= 0:
            return 0.0
        self._pages += pages
        now = time.monotonic()
        due = self._t0 + self._pages / self.pages_per_s
        if now - due > 1.0:  # far behind (slow guest): do not try to catch up in a burst
            self.restart()
            return 0.0
        return max(0.0, due - now)


class VcpuRunner:
    """The vCPU threads of one VM and their shared run/pause state."""

    def __init__(self, vm: GuestVm, rate_bytes: int) -> None:
        self.vm = vm
        self.pacer = Pacer(rate_bytes)
        self._cond = threading.Condition()
        self._paused = True
        self._stopping = False
        self._parked: set[int] = set()
        self._threads: list[threading.Thread] = []
        self.crashed: str | None = None
        #: auto-converge: after each run, the vCPU sleeps so it runs only 1 - throttle of the time
        self.throttle = 0.0
        self.counters: dict[str, int] = {"exits": 0, "batches": 0, "pages": 0, "idle_ticks": 0}

    @property
    def running(self) -> bool:
        return not self._paused

    def start_threads(self) -> None:
        """Start parked threads (the VM stays paused until resume())."""
        for vcpu in self.vm.vcpus:
            t = threading.Thread(target=self._loop, args=(vcpu,), name=f"vcpu{vcpu.index}", daemon=True)
            self._threads.append(t)
            t.start()
        self._wait_parked()

    def resume(self) -> None:
        if self.crashed:
            raise RuntimeError(f"guest crashed: {self.crashed}")
        with self._cond:
            if not self._paused:
                return
            self.pacer.restart()
            for vcpu in self.vm.vcpus:
                vcpu.run.immediate_exit = 0
            self._paused = False
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            self._paused = True
            for vcpu in self.vm.vcpus:
                vcpu.run.immediate_exit = 1
            self._cond.notify_all()  # wakes threads sleeping for the pacer
        self._wait_parked()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._paused = True
            for vcpu in self.vm.vcpus:
                vcpu.run.immediate_exit = 1
            self._cond.notify_all()
        self._wait_parked()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5.0)

    def _wait_parked(self) -> None:
        n = len(self.vm.vcpus)
        while True:
            with self._cond:
                if len(self._parked) == n or all(not t.is_alive() for t in self._threads):
                    return
                waiting = [t for t in self._threads if t.is_alive() and t.ident is not None]
            for t in waiting:  # kick anyone still in KVM_RUN; harmless for the others
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)  # type: ignore[arg-type]
                except ProcessLookupError:
                    pass
            with self._cond:
                self._cond.wait_for(lambda: len(self._parked) == n, timeout=0.01)

    # ------------------------------------------------------------------ vCPU thread

    def _loop(self, vcpu: Vcpu) -> None:
        needs_completion = False
        while True:
            with self._cond:
                if self._paused:
                    if needs_completion:
                        self._complete_pending(vcpu)
                        needs_completion = False
                    self._parked.add(vcpu.index)
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: not self._paused or self._stopping)
                    self._parked.discard(vcpu.index)
                    if self._stopping:
                        self._parked.add(vcpu.index)
                        self._cond.notify_all()
                        return
            ran_from = time.monotonic()
            try:
                k.ioctl(vcpu.fd, k.KVM_RUN)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                self._crash(vcpu, f"KVM_RUN failed: {exc}")
                continue
            throttle = self.throttle
            if throttle > 0:
                # QEMU's cpu throttling: sleep in proportion to the time just run
                self._sleep(min(0.1, (time.monotonic() - ran_from) * throttle / (1.0 - throttle)))
            needs_completion = True
            self.counters["exits"] += 1
            self._handle_exit(vcpu)

    def _complete_pending(self, vcpu: Vcpu) -> None:
        """Re-enter with immediate_exit so KVM finishes the last I/O instruction (see module doc)."""
        vcpu.run.immediate_exit = 1
        try:
            k.ioctl(vcpu.fd, k.KVM_RUN)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                log.warning("vcpu%d: completing I/O failed: %s", vcpu.index, exc)

    def _handle_exit(self, vcpu: Vcpu) -> None:
        reason = int(vcpu.run.exit_reason)
        if reason == k.KVM_EXIT_IO and vcpu.run.exit.io.direction == k.KVM_EXIT_IO_OUT:
            port = int(vcpu.run.exit.io.port)
            if port == PORT_BATCH:
                pages = vcpu.io_data()
                self.counters["batches"] += 1
                self.counters["pages"] += pages
                self._sleep(self.pacer.delay_after(pages))
            elif port == PORT_IDLE:
                self.counters["idle_ticks"] += 1
                self._sleep(IDLE_TICK_S)
            elif port == PORT_AP_IDLE:
                self._sleep(AP_IDLE_S)
            return
        if reason == k.KVM_EXIT_IO:
            return  # an IN from a port we do not have reads whatever is in the buffer
        if reason == k.KVM_EXIT_HLT:
            self._crash(vcpu, "guest halted")
            return
        if reason in (k.KVM_EXIT_INTR,):
            return
        detail = _FATAL_EXITS.get(reason, f"exit reason {reason}")
        extra = int(vcpu.run.exit.hardware_exit_reason)
        self._crash(vcpu, f"{detail} (data {extra:#x})")

    def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._paused, timeout=seconds)

    def _crash(self, vcpu: Vcpu, why: str) -> None:
        """The guest cannot continue: report it and pause the VM (a crashed guest stays inspectable)."""
        log.error("vcpu%d: %s", vcpu.index, why)
        with self._cond:
            if self.crashed is None:
                self.crashed = f"vcpu{vcpu.index}: {why}"
            self._paused = True
            for v in self.vm.vcpus:
                v.run.immediate_exit = 1
            self._cond.notify_all()

    def progress(self) -> dict[str, Any]:
        return dict(self.counters)

    def restore_progress(self, progress: dict[str, Any]) -> None:
        for key in self.counters:
            value = progress.get(key)
            if isinstance(value, int):
                self.counters[key] = value
