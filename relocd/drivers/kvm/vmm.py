"""Main program of a KVM domain process (the micro-VMM): ``python -m relocd.drivers.kvm.vmm ...``.

It owns the VM (KVM ties a VM to the process that created it), the guest
memory memfd and a second memfd holding the dirty bitmap; both are passed to
the daemon over the control socket (domproc.py), so memory and dirty logs
never travel through the socket.  Started in its own session by the driver,
it outlives daemon restarts and exits when told to (``shutdown``), on
SIGTERM, or when setup fails (logged to stderr = ``<uuid>.log``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import ctypes
import functools
import logging
import os
import sys
import threading
import time
import uuid as uuidlib
from pathlib import Path

from relocd.drivers import procmain
from relocd.drivers.domproc import ControlServer, Message, Reply, RequestFailed
from relocd.drivers.kvm import layout, state
from relocd.drivers.kvm.runner import Pacer, VcpuRunner, batch_pages, install_kick_handler
from relocd.drivers.kvm.vm import GuestVm, KvmSystem
from relocd.drivers.workload import WorkloadSpec, parse_workload
from relocd.errors import ConfigError
from relocd.units import PAGE_SIZE

log = logging.getLogger("relocd.kvm.vmm")

PROTOCOL = 1
GUEST_BINARY = Path(__file__).with_name("guest") / "guest.bin"
DIRTY_MODES = ("get", "clear")  # KVM_GET_DIRTY_LOG alone, or with KVM_CLEAR_DIRTY_LOG
DEFAULT_DIRTY_MODE = "clear"
_KINDS = {
    "idle": layout.WorkloadKind.IDLE,
    "uniform": layout.WorkloadKind.UNIFORM,
    "hotset": layout.WorkloadKind.HOTSET,
    "sweep": layout.WorkloadKind.SWEEP,
}


def bitmap_bytes(npages: int) -> int:
    """Size of a KVM dirty bitmap: one bit per page, in whole uint64 words."""
    return (npages + 63) // 64 * 8


class Vmm:
    """One VM and the answers to the daemon's requests about it."""

    def __init__(self, uuid: str, memory_bytes: int, nvcpus: int, spec: WorkloadSpec,
                 dirty_mode: str, stop: threading.Event, *, allocate: bool = True,
                 memory_fd: int | None = None, bitmap_fd: int | None = None,
                 memory_dir: str | None = None) -> None:
        self.uuid = uuid
        self.spec = spec
        self.stop = stop
        self.npages = memory_bytes // PAGE_SIZE
        # allocate=False for a VM built paused for an incoming migration or a
        # restore: the daemon populates its memory in the background (populate.py)
        # (memory_fd, bitmap_fd: the daemon's, inherited, for a VM built paused)
        self.memory_fd, self._memory = procmain.memfd(
            f"relocd-kvm-{uuid}", memory_bytes, allocate=allocate, fd=memory_fd, directory=memory_dir
        )
        self.bitmap_fd, self._bitmap = procmain.memfd(
            f"relocd-kvm-dirty-{uuid}", bitmap_bytes(self.npages), allocate=False, fd=bitmap_fd
        )
        self._bitmap_anchor = ctypes.c_char.from_buffer(self._bitmap)
        self.bitmap_addr = ctypes.addressof(self._bitmap_anchor)
        self.system = KvmSystem()
        self.vm = GuestVm(self.system, self.memory_fd, memory_bytes, nvcpus,
                          manual_protect=(dirty_mode == "clear"))
        self.caps = state.VcpuCaps.probe(self.system)
        self.runner = VcpuRunner(self.vm, spec.rate_bytes if spec.kind != "idle" else 0)
        self.has_state = False  # booted or loaded: the vCPUs have something to run
        self._lock = threading.Lock()

    def boot(self) -> None:
        """Write the guest image and put every vCPU at its entry point in long mode."""
        code = GUEST_BINARY.read_bytes()
        seed = (uuidlib.UUID(self.uuid).int & ((1 << 64) - 1)) | 1
        layout.write_boot_image(
            memoryview(self._memory), code, _KINDS[self.spec.kind], batch_pages(self.spec.rate_bytes),
            self.spec.hot_bytes // PAGE_SIZE, seed, stamped=self.spec.fill == "stamped",
        )
        for vcpu in self.vm.vcpus:
            vcpu.enter_long_mode()
        self.has_state = True

    def __call__(self, request: Message, fds: list[int]) -> Reply:
        for fd in fds:
            os.close(fd)
        op = str(request.get("op"))
        with self._lock:
            try:
                return self._handle(op, request)
            except (OSError, state.StateError, RuntimeError) as exc:
                raise RequestFailed(f"{op}: {exc}") from None

    def _handle(self, op: str, request: Message) -> Reply:
        runner = self.runner
        if op == "hello":
            return {
                "protocol": PROTOCOL,
                "driver": "kvm",
                "pid": os.getpid(),
                "uuid": self.uuid,
                "npages": self.npages,
                "bitmap_bytes": bitmap_bytes(self.npages),
                "running": runner.running,
                "dirty_mode": "clear" if self.vm.manual_protect else "get",
            }, [self.memory_fd, self.bitmap_fd]
        if op == "pause":
            runner.pause()
        elif op == "resume":
            if not self.has_state:
                raise RequestFailed("resume: no vCPU state loaded yet")
            runner.resume()
        elif op == "dirty_start":
            self.vm.dirty_log_start(self.bitmap_addr)
        elif op == "dirty_fetch":
            t0 = time.perf_counter()
            self.vm.dirty_log_fetch(self.bitmap_addr)
            return {"fetch_us": round((time.perf_counter() - t0) * 1e6, 1)}, []
        elif op == "dirty_stop":
            self.vm.dirty_log_stop()
        elif op == "save_state":
            if runner.running:
                raise RequestFailed("save_state: the domain must be paused")
            blob = state.save_vm(self.vm, self.caps, runner.progress())
            return {"blob": base64.b64encode(blob).decode()}, []
        elif op == "load_state":
            if runner.running:
                raise RequestFailed("load_state: the domain must be paused")
            try:
                blob = base64.b64decode(str(request.get("blob", "")), validate=True)
            except binascii.Error:
                raise RequestFailed("load_state: blob is not base64") from None
            runner.restore_progress(state.load_vm(self.vm, self.caps, blob))
            self.has_state = True
        elif op == "stats":
            return {"running": runner.running, "crashed": runner.crashed, "logging": self.vm.logging,
                    "dirty_mode": "clear" if self.vm.manual_protect else "get", **runner.progress()}, []
        elif op == "configure":
            # An incoming VM learns its workload after it was built: the
            # guest's own parameters travel in its memory, the pacing is ours.
            if runner.running:
                raise RequestFailed("configure: the domain has already started")
            try:
                self.spec = parse_workload(str(request.get("workload", "")))
            except ConfigError as exc:
                raise RequestFailed(f"configure: {exc.message}") from None
            runner.pacer = Pacer(self.spec.rate_bytes if self.spec.kind != "idle" else 0)
        elif op == "throttle":
            fraction = request.get("fraction")
            if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
                raise RequestFailed("throttle needs a 'fraction' from 0 up to 1")
            runner.throttle = float(fraction)
        elif op == "shutdown":
            runner.pause()
            self.stop.set()
        else:
            raise RequestFailed(f"unknown request {op!r}")
        return {}, []

    def close(self) -> None:
        self.runner.stop()
        self.vm.close()
        self.system.close()


def _setup(args: argparse.Namespace, stop: threading.Event) -> procmain.SetUp:
    dom = procmain.DomainArgs.check(args)
    layout.GuestLayout.for_pages(dom.npages)
    vmm = Vmm(dom.uuid, args.memory_bytes, args.vcpus, dom.spec, args.dirty_mode, stop, allocate=not args.paused,
              memory_fd=args.memory_fd, bitmap_fd=args.shared_fd, memory_dir=args.memory_dir)
    if not args.paused:
        vmm.boot()
    vmm.runner.start_threads()
    server = ControlServer(args.socket, vmm)

    def start() -> None:
        if not args.paused:
            vmm.runner.resume()
        log.info("VM %s up: %d pages, %d vCPUs, workload %s, dirty log %s, %s", dom.uuid, vmm.npages,
                 args.vcpus, dom.spec, "clear" if vmm.vm.manual_protect else "get",
                 "paused" if args.paused else "running")

    def finish() -> None:
        time.sleep(0.05)  # let the reply to 'shutdown' leave before the process goes
        vmm.close()
        log.info("VM %s stopped", dom.uuid)

    return procmain.SetUp(server, start, finish)


def main(argv: list[str] | None = None) -> int:
    parser = procmain.argument_parser(
        "relocd.drivers.kvm.vmm", paused_help="zero memory, no vCPU state: wait for pages and load_state"
    )
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--dirty-mode", choices=DIRTY_MODES, default=DEFAULT_DIRTY_MODE)
    args = parser.parse_args(argv)
    procmain.log_to_stderr("kvm")
    install_kick_handler()
    return procmain.serve(functools.partial(_setup, args), what="VM", log=log)


if __name__ == "__main__":
    sys.exit(main())
