"""What the main programs of domain processes share (sim's ``process.py``, kvm's ``vmm.py``).

Both take the same core options from the driver (procdriver.py builds the
command line), log to stderr (the driver points it at ``<uuid>.log``), set up
their guest and control socket, and then serve the daemon until told to stop
(``shutdown`` sets the stop event) or signalled (SIGTERM, SIGINT).  A setup
failure is one line in the log and exit status 1, never a traceback unless
it is a bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import mmap
import os
import signal
import sys
import threading
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from relocd.drivers.domproc import ControlServer
from relocd.drivers.workload import WorkloadSpec, parse_workload
from relocd.errors import ConfigError
from relocd.units import PAGE_SIZE


def argument_parser(prog: str, *, paused_help: str) -> argparse.ArgumentParser:
    """A parser with the options every domain process takes; a driver adds its own."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--uuid", required=True)
    parser.add_argument("--memory-bytes", required=True, type=int)
    parser.add_argument("--workload", default="idle")
    parser.add_argument("--paused", action="store_true", help=paused_help)
    # A domain built paused gets its two memfds from the daemon, which made
    # them and already populates guest memory while this process starts.
    parser.add_argument("--memory-fd", type=int, default=None, help="guest memory memfd, inherited")
    parser.add_argument("--shared-fd", type=int, default=None, help="the second shared memfd, inherited")
    parser.add_argument("--memory-dir", default=None,
                        help="make guest memory a file in this tmpfs (huge pages where it is mounted huge=)")
    return parser


@dataclasses.dataclass(frozen=True)
class DomainArgs:
    """The core options, checked: what every guest is built from."""

    uuid: str
    spec: WorkloadSpec
    npages: int

    @classmethod
    def check(cls, args: argparse.Namespace) -> DomainArgs:
        """ValueError or ConfigError (a setup failure) when an option is wrong."""
        uuid = str(uuidlib.UUID(args.uuid))
        spec = parse_workload(args.workload)
        if args.memory_bytes <= 0 or args.memory_bytes % PAGE_SIZE:
            raise ValueError(f"memory size {args.memory_bytes} is not a positive multiple of {PAGE_SIZE}")
        return cls(uuid, spec, args.memory_bytes // PAGE_SIZE)


def memory_file(name: str, directory: str | os.PathLike[str] | None = None) -> int:
    """A new, empty, nameless shared-memory file: a memfd, or an ``O_TMPFILE`` in ``directory``.

    ``directory`` is ``relocd-guest-memory-dir``: a tmpfs the operator
    mounted (``huge=always`` gives guest memory 2 MiB pages, which memfds
    cannot have where shmem THP is off; docs/memory.md).  The file has no
    name, so it goes away with its last descriptor and mapping, as a memfd does.
    """
    if directory is None:
        return os.memfd_create(name, os.MFD_CLOEXEC)
    return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)


def memfd(
    name: str, size: int, *, allocate: bool, fd: int | None = None, directory: str | None = None
) -> tuple[int, mmap.mmap]:
    """A memfd of ``size`` bytes and a shared read-write mapping of it (``memory_file``: where it lives).

    ``fd``: the daemon's memfd, inherited (``--memory-fd``, ``--shared-fd``),
    instead of a new one; ValueError (a setup failure) if it is not that size.

    ``allocate`` sets every page aside now (``fallocate``: allocated, not yet
    zeroed or mapped), so a shortage fails here rather than on a later write.
    A booted guest asks for it; a domain built paused for an incoming
    migration or a restore does not: the daemon populates that memory in the
    background while pages arrive (populate.py), which keeps the reservation
    short whatever the guest's size.
    """
    if fd is not None:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ValueError(f"inherited memfd {fd} has {actual} bytes, not {size}")
        os.set_inheritable(fd, False)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    fd = memory_file(name, directory)
    try:
        os.ftruncate(fd, size)
        if allocate:
            os.posix_fallocate(fd, 0, size)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise


def log_to_stderr(tag: str) -> None:
    """Log lines as ``TIME TAG[PID] LEVEL message`` on stderr."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format=f"%(asctime)s {tag}[%(process)d] %(levelname)s %(message)s"
    )


@dataclasses.dataclass(frozen=True)
class SetUp:
    """A domain process ready to serve: its control socket and what runs around the serve loop."""

    server: ControlServer
    #: after the signal handlers are in place: let the guest run
    start: Callable[[], None]
    #: after the serve loop ended: stop the guest, release what it holds
    finish: Callable[[], None]


#: GIL switch interval in a domain process (the default is 5 ms)
REQUEST_SWITCH_INTERVAL_S = 0.0005


def serve(setup: Callable[[threading.Event], SetUp], *, what: str, log: logging.Logger) -> int:
    """Set up (``setup`` gets the stop event), then serve until stopped; the exit status."""
    # The daemon's requests (pause, a dirty-log fetch, the vCPU state: each
    # inside a migration's rounds or its downtime) are served by the main
    # thread while a guest thread may hold the GIL: at the default 5 ms
    # switch interval a request waited up to 5 ms per handover.
    sys.setswitchinterval(REQUEST_SWITCH_INTERVAL_S)
    stop = threading.Event()
    try:
        ready = setup(stop)
    except (OSError, ValueError, ConfigError) as exc:
        log.error("%s setup failed: %s", what, exc)
        return 1
    except Exception:
        log.exception("%s setup failed", what)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ready.start()
    ready.server.serve_until(stop)
    ready.finish()
    return 0
