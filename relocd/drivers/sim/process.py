"""Main program of a sim domain process: ``python -m relocd.drivers.sim.process ...``.

It owns the guest's memory (a memfd), runs the workload, and answers the
daemon on its control socket; the daemon maps the same memfd, received over
the socket, so guest memory is never copied between them.  Started in its own
session by the driver, it outlives daemon restarts and exits only when told
to (``shutdown``), on SIGTERM, or when its setup fails (logged to stderr,
which the driver points at ``<uuid>.log``).
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import signal
import sys
import threading
import uuid as uuidlib
from pathlib import Path
from types import FrameType

from relocd.drivers.domproc import ControlServer, Message, Reply, RequestFailed
from relocd.drivers.sim import status as status_area
from relocd.drivers.sim.guest import Guest, GuestError
from relocd.drivers.workload import parse_workload
from relocd.errors import ConfigError
from relocd.units import PAGE_SIZE

log = logging.getLogger("relocd.sim.process")

PROTOCOL = 1


class SimRequests:
    """Answers the daemon's requests on behalf of one guest."""

    def __init__(self, guest: Guest, uuid: str, memory_fd: int, status_fd: int, stop: threading.Event) -> None:
        self.guest = guest
        self.uuid = uuid
        self.memory_fd = memory_fd
        self.status_fd = status_fd
        self.stop = stop

    def __call__(self, request: Message, fds: list[int]) -> Reply:
        for fd in fds:  # nothing we ask for ever comes with descriptors
            os.close(fd)
        op = request.get("op")
        try:
            return self._handle(str(op), request)
        except GuestError as exc:
            raise RequestFailed(str(exc)) from None

    def _handle(self, op: str, request: Message) -> Reply:
        guest = self.guest
        if op == "hello":
            return {
                "protocol": PROTOCOL,
                "driver": "sim",
                "pid": os.getpid(),
                "uuid": self.uuid,
                "npages": guest.npages,
                "memory_bytes": guest.npages * PAGE_SIZE,
                "status_bytes": status_area.area_size(guest.npages),
            }, [self.memory_fd, self.status_fd]
        if op == "pause":
            guest.pause()
        elif op == "resume":
            guest.resume()
        elif op == "dirty_start":
            guest.dirty_start()
        elif op == "dirty_fetch":
            return {"count": guest.dirty_fetch()}, []
        elif op == "dirty_stop":
            guest.dirty_stop()
        elif op == "save_state":
            return {"blob": guest.save_state()}, []
        elif op == "load_state":
            blob = request.get("blob")
            if not isinstance(blob, str):
                raise RequestFailed("load_state needs a 'blob' string")
            guest.load_state(blob)
        elif op == "configure":
            workload = request.get("workload")
            if not isinstance(workload, str):
                raise RequestFailed("configure needs a 'workload' string")
            try:
                guest.configure(parse_workload(workload))
            except ConfigError as exc:
                raise RequestFailed(exc.message) from None
        elif op == "shutdown":
            guest.pause()
            self.stop.set()
        else:
            raise RequestFailed(f"unknown request {op!r}")
        return {}, []


def _memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        # Allocate every page now: memory really set aside (a shortage fails
        # here, cleanly, instead of as SIGBUS on a later write), and the
        # receive path of a migration no longer pays a page allocation per page.
        os.posix_fallocate(fd, 0, size)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="relocd.drivers.sim.process")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--uuid", required=True)
    parser.add_argument("--memory-bytes", required=True, type=int)
    parser.add_argument("--workload", default="idle")
    parser.add_argument("--paused", action="store_true", help="start with zero memory, not booted, paused")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s sim[%(process)d] %(levelname)s %(message)s"
    )
    stop = threading.Event()
    try:
        uuid = str(uuidlib.UUID(args.uuid))
        spec = parse_workload(args.workload)
        if args.memory_bytes <= 0 or args.memory_bytes % PAGE_SIZE:
            raise ValueError(f"memory size {args.memory_bytes} is not a positive multiple of {PAGE_SIZE}")
        npages = args.memory_bytes // PAGE_SIZE
        memory_fd, memory = _memfd(f"relocd-sim-{uuid}", args.memory_bytes)
        status_fd, status = _memfd(f"relocd-sim-status-{uuid}", status_area.area_size(npages))
        guest = Guest(memory, status, npages, spec, seed=uuidlib.UUID(uuid).int)
        if not args.paused:
            guest.boot()
        server = ControlServer(args.socket, SimRequests(guest, uuid, memory_fd, status_fd, stop))
    except (OSError, ValueError, ConfigError) as exc:
        log.error("domain setup failed: %s", exc)
        return 1
    except Exception:
        log.exception("domain setup failed")
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    guest.start_thread()
    if not args.paused:
        guest.resume()
    log.info("domain %s up: %d pages, workload %s, %s", uuid, npages, spec, "paused" if args.paused else "running")
    server.serve_until(stop)
    guest.pause()
    guest.stop_thread()
    log.info("domain %s stopped", uuid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
