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
import functools
import logging
import os
import sys
import threading
import uuid as uuidlib

from relocd.drivers import procmain
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
        elif op == "throttle":
            fraction = request.get("fraction")
            if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
                raise RequestFailed("throttle needs a 'fraction' from 0 up to 1")
            guest.throttle = float(fraction)
        elif op == "shutdown":
            guest.pause()
            self.stop.set()
        else:
            raise RequestFailed(f"unknown request {op!r}")
        return {}, []


def _setup(args: argparse.Namespace, stop: threading.Event) -> procmain.SetUp:
    dom = procmain.DomainArgs.check(args)
    # A paused domain waits for an incoming migration or a restore: the
    # daemon populates its memory in the background (drivers/populate.py).
    memory_fd, memory = procmain.memfd(
        f"relocd-sim-{dom.uuid}", args.memory_bytes, allocate=not args.paused, fd=args.memory_fd,
        directory=args.memory_dir,
    )
    status_size = status_area.area_size(dom.npages)
    status_fd, status = procmain.memfd(
        f"relocd-sim-status-{dom.uuid}", status_size, allocate=True, fd=args.shared_fd
    )
    guest = Guest(memory, status, dom.npages, dom.spec, seed=uuidlib.UUID(dom.uuid).int)
    if not args.paused:
        guest.boot()
    server = ControlServer(args.socket, SimRequests(guest, dom.uuid, memory_fd, status_fd, stop))

    def start() -> None:
        guest.start_thread()
        if not args.paused:
            guest.resume()
        state = "paused" if args.paused else "running"
        log.info("domain %s up: %d pages, workload %s, %s", dom.uuid, dom.npages, dom.spec, state)

    def finish() -> None:
        guest.pause()
        guest.stop_thread()
        log.info("domain %s stopped", dom.uuid)

    return procmain.SetUp(server, start, finish)


def main(argv: list[str] | None = None) -> int:
    parser = procmain.argument_parser(
        "relocd.drivers.sim.process", paused_help="start with zero memory, not booted, paused"
    )
    args = parser.parse_args(argv)
    procmain.log_to_stderr("sim")
    return procmain.serve(functools.partial(_setup, args), what="domain", log=log)


if __name__ == "__main__":
    sys.exit(main())
