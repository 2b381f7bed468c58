"""The daemon side of drivers that run each domain as its own OS process (``sim``, ``kvm``).

What differs between them is how the process is started, what it shares and
what its state blob and counters look like; everything else lives here:

Files under ``STATE_DIR/<driver name>/``, per domain: ``<uuid>.json`` (record
format, config and pid; rewritten by ``rename`` and ``configure``),
``<uuid>.sock`` (the process's control socket, see domproc.py) and
``<uuid>.log`` (its stderr).  A daemon restarted onto the same state dir finds
its domains again from the records (``start``).

Every domain process answers ``hello`` with its pid, uuid, page count and
driver name, and two memfds: guest memory, and a second shared area whose
dirty bitmap starts at ``ProcessDomain.bitmap_offset``.  Both are mapped here,
so ``memory()`` and dirty-log fetches never copy guest memory.

A domain built paused (``create(start=False)``: an incoming migration, a
restore) is the other way round, so that a target's reservation takes
milliseconds whatever the guest's size: the daemon makes both memfds,
populates guest memory in worker threads (populate.py) and starts the
process with the memfds inherited, without waiting for it; requests wait
until it answers ``hello`` (``_build_paused``).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from pydantic import ValidationError

import relocd
from relocd.drivers import domproc, populate, procmain
from relocd.drivers.base import Domain, DomainConfig, Driver
from relocd.drivers.populate import Populator
from relocd.drivers.procdomain import ProcessDomain, ProcessLink
from relocd.drivers.workload import parse_workload
from relocd.errors import ConfigError, DomainExists, DriverError

#: version of the ``<uuid>.json`` record
RECORD_FORMAT = 1


D = TypeVar("D", bound=ProcessDomain)


class ProcessDriver(Driver, Generic[D]):
    """Finds, starts, renames and stops domain processes; one per domain, records under ``state_dir/name``."""

    #: ``python -m`` module of the domain process
    process_module: ClassVar[str]
    #: what messages call a domain process ("domain process", "VMM")
    process_noun: ClassVar[str] = "domain process"

    def __init__(self, state_dir: Path, *, memory_dir: Path | None = None) -> None:
        super().__init__(state_dir)
        self.dir = state_dir / self.name
        #: relocd-guest-memory-dir: guest memory as files in this tmpfs (None: memfds)
        self.memory_dir = memory_dir
        self._domains: dict[str, D] = {}
        self._claimed: set[str] = set()  # names and uuids of domains being created
        self._lock = threading.Lock()
        self._log = logging.getLogger(type(self).__module__)  # the concrete driver's module, as before
        #: processes told to shut down, waited for (and their memory freed) in the background
        self._reapers: set[threading.Thread] = set()

    # ---------------------------------------------------------------- what each driver says

    def _check_config(self, config: DomainConfig) -> None:
        """Refuse (DriverError) a config this driver cannot build, before anything is claimed."""

    def _check_host(self) -> None:
        """Refuse (DriverError) to start a domain process on a host that cannot run it."""

    @abc.abstractmethod
    def _process_options(self, config: DomainConfig) -> list[str]:
        """Command-line options of the domain process beyond socket, uuid, memory, workload and paused."""

    @abc.abstractmethod
    def _shared_bytes(self, npages: int) -> int:
        """Size of the second memfd a domain process of ``npages`` pages shares."""

    @abc.abstractmethod
    def _domain(self, config: DomainConfig, link: ProcessLink, popen: subprocess.Popen[bytes] | None) -> D:
        """The handle on a domain process that answered ``hello`` (or, built paused, will: see ``_build_paused``)."""

    def _init_shared(self, area: mmap.mmap, config: DomainConfig) -> None:
        """Fill a fresh second memfd (read-write here) the way the domain process will, before it starts."""

    # ---------------------------------------------------------------- records

    def _paths(self, uuid: str) -> tuple[Path, Path, Path]:
        return self.dir / f"{uuid}.json", self.dir / f"{uuid}.sock", self.dir / f"{uuid}.log"

    def _write_record(self, config: DomainConfig, pid: int) -> None:
        record = {"format": RECORD_FORMAT, "config": config.model_dump(mode="json"), "pid": pid}
        path = self._paths(config.uuid)[0]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)

    def _remove_files(self, uuid: str) -> None:
        for path in self._paths(uuid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ---------------------------------------------------------------- Driver

    def domains(self) -> list[Domain]:
        with self._lock:
            return list(self._domains.values())

    async def start(self) -> None:
        await asyncio.to_thread(self._discover)

    async def close(self) -> None:
        with self._lock:
            domains, self._domains = list(self._domains.values()), {}
        for domain in domains:
            if domain._settling is not None:
                domain._settling.cancel()
            domain.detach()
        await asyncio.to_thread(self.wait_reaped)

    def wait_reaped(self, timeout: float = 15.0) -> None:
        """Wait for the domain processes destroyed in the background to be gone."""
        deadline = time.monotonic() + timeout
        for thread in list(self._reapers):
            thread.join(max(0.0, deadline - time.monotonic()))

    async def create(self, config: DomainConfig, *, start: bool = True) -> D:
        if config.driver != self.name:
            raise DriverError(f"domain {config.name} wants driver {config.driver!r}, not {self.name!r}")
        spec = parse_workload(config.workload)
        self._check_config(config)
        keys = {config.name, config.uuid}
        with self._lock:
            for d in self._domains.values():
                if d.name == config.name or d.config.uuid == config.uuid:
                    raise DomainExists(f"domain {d.name} ({d.config.uuid}) already exists")
            if keys & self._claimed:
                raise DomainExists(f"domain {config.name} is already being created")
            self._claimed |= keys
        try:
            return await asyncio.to_thread(self._create_sync, config, str(spec), start)
        finally:
            with self._lock:
                self._claimed -= keys

    def _create_sync(self, config: DomainConfig, workload: str, start: bool) -> D:
        self._check_host()
        self.dir.mkdir(parents=True, exist_ok=True)
        _, sock_path, log_path = self._paths(config.uuid)
        argv = [
            sys.executable, "-m", self.process_module,
            "--socket", str(sock_path),
            "--uuid", config.uuid,
            "--memory-bytes", str(config.memory_bytes),
            "--workload", workload,
            *self._process_options(config),
        ]  # fmt: skip
        if self.memory_dir is not None:
            argv += ["--memory-dir", str(self.memory_dir)]
        if not start:
            argv.append("--paused")
        package_root = str(Path(relocd.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._write_record(config, 0)
        if not start:
            return self._build_paused(config, argv, env)
        popen = None
        try:
            popen = domproc.spawn(
                argv,
                socket_path=sock_path,
                log_path=log_path,
                timeout=30.0 + 10.0 * (config.memory_bytes / (1 << 30)),
                env=env,
            )
            self._write_record(config, popen.pid)
            domain = self._attach(config, popen)
        except BaseException:
            if popen is not None:
                domproc.stop_process(popen.pid, marker=config.uuid, popen=popen, grace=0.0)
            self._remove_files(config.uuid)
            raise
        with self._lock:
            self._domains[config.uuid] = domain
        self._log.info("created %s domain %s (%s), pid %d", self.name, config.name, config.uuid, domain.pid)
        return domain

    def _build_paused(self, config: DomainConfig, argv: list[str], env: dict[str, str]) -> D:
        """A paused, empty domain for an incoming migration or a restore, ready in milliseconds.

        The daemon makes both memfds itself, maps them and starts populating
        guest memory (populate.py), then starts the domain process with the
        memfds inherited and returns without waiting for it: a Python process
        takes a few hundred ms to come up, and the reservation should not.
        Pages land in memory meanwhile (the daemon's own mapping); the first
        request to the process (``load_state`` at the latest, before the
        target says PREPARED) waits for it to answer ``hello``, and fails with
        its own error if it never does.
        """
        _, sock_path, log_path = self._paths(config.uuid)
        shared_size = self._shared_bytes(config.npages)
        fds: list[int] = []
        areas: list[mmap.mmap] = []
        populator: Populator | None = None
        popen: subprocess.Popen[bytes] | None = None
        try:
            for name, size, where in ((f"relocd-{self.name}-{config.uuid}", config.memory_bytes, self.memory_dir),
                                      (f"relocd-{self.name}-shared-{config.uuid}", shared_size, None)):  # fmt: skip
                fds.append(procmain.memory_file(name, where))
                os.ftruncate(fds[-1], size)
            memory_fd, shared_fd = fds
            with mmap.mmap(shared_fd, shared_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as init:
                self._init_shared(init, config)
            areas.append(mmap.mmap(memory_fd, config.memory_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            areas.append(mmap.mmap(shared_fd, shared_size, mmap.MAP_SHARED, mmap.PROT_READ))
            memory, shared = areas
            populator = Populator(memory, name=f"populate-{config.uuid[:8]}", nice=populate.WRITE_NICE).start()
            identity = [(st.st_dev, st.st_ino) for st in map(os.fstat, fds)]
            popen = domproc.start(
                [*argv, "--memory-fd", str(memory_fd), "--shared-fd", str(shared_fd)],
                socket_path=sock_path, log_path=log_path, env=env, pass_fds=fds,
            )  # fmt: skip
            self._write_record(config, popen.pid)
            starting: concurrent.futures.Future[None] = concurrent.futures.Future()
            starting.set_running_or_notify_cancel()  # resolved by the thread below, never cancelled
            hello = {"pid": popen.pid, "running": False}
            domain = self._domain(config, ProcessLink(domproc.DomainProcessClient(sock_path), hello, memory, shared), popen)
        except BaseException:
            if populator is not None:
                populator.stop()
            for area in areas:
                area.close()
            if popen is not None:
                domproc.stop_process(popen.pid, marker=config.uuid, popen=popen, grace=0.0)
            self._remove_files(config.uuid)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        domain._populator = populator
        domain._starting = starting
        threading.Thread(
            target=self._await_process, args=(config, popen, identity, starting), name=f"start-{config.uuid[:8]}",
            daemon=True,
        ).start()  # fmt: skip
        with self._lock:
            self._domains[config.uuid] = domain
        self._log.info(
            "created %s domain %s (%s) paused, pid %d (coming up)", self.name, config.name, config.uuid, popen.pid
        )
        return domain

    def _await_process(
        self,
        config: DomainConfig,
        popen: subprocess.Popen[bytes],
        identity: list[tuple[int, int]],
        starting: concurrent.futures.Future[None],
    ) -> None:
        """Wait for a domain process built paused to serve, and check it is the one we made (a thread)."""
        _, sock_path, log_path = self._paths(config.uuid)
        noun = self.process_noun
        try:
            domproc.wait_serving(popen, socket_path=sock_path, log_path=log_path, timeout=30.0)
            client = domproc.DomainProcessClient(sock_path)
            try:
                reply, fds = client.call("hello")
            finally:
                client.close()
            try:
                if (
                    reply.get("driver") != self.name
                    or reply.get("uuid") != config.uuid
                    or reply.get("npages") != config.npages
                    or [(st.st_dev, st.st_ino) for st in map(os.fstat, fds)] != identity
                ):
                    raise DriverError(f"{noun} for {config.uuid} answered for someone else: {reply}")
            finally:
                for fd in fds:
                    os.close(fd)
        except DriverError as exc:
            self._log.warning("%s domain %s did not come up: %s", self.name, config.name, exc.message)
            starting.set_exception(DriverError(f"domain {config.name}: {exc.message}"))
        except BaseException as exc:  # a bug: whoever waits must still hear of it
            self._log.exception("%s domain %s: waiting for its %s failed", self.name, config.name, noun)
            starting.set_exception(DriverError(f"domain {config.name}: {noun} start failed: {exc}"))
        else:
            starting.set_result(None)

    def _attach(self, config: DomainConfig, popen: subprocess.Popen[bytes] | None = None) -> D:
        """Connect to a domain process, map guest memory and the second area it shares."""
        client = domproc.DomainProcessClient(self._paths(config.uuid)[1])
        try:
            reply, fds = client.call("hello")
        except DriverError:
            client.close()
            raise
        noun = self.process_noun
        try:
            if (
                reply.get("driver") != self.name
                or reply.get("uuid") != config.uuid
                or reply.get("npages") != config.npages
                or len(fds) != 2
            ):
                raise DriverError(f"{noun} for {config.uuid} answered for someone else: {reply}")
            memory_fd, shared_fd = fds
            shared_size = self._shared_bytes(config.npages)
            if os.fstat(memory_fd).st_size != config.memory_bytes or os.fstat(shared_fd).st_size != shared_size:
                raise DriverError(f"{noun} for {config.uuid} shared memory of the wrong size")
            memory = mmap.mmap(memory_fd, config.memory_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            shared = mmap.mmap(shared_fd, shared_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            client.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        try:
            return self._domain(config, ProcessLink(client, reply, memory, shared), popen)
        except BaseException:
            client.close()
            raise

    def _discover(self) -> None:
        """Reattach to every domain process still running; clean up after the dead ones."""
        if not self.dir.is_dir():
            return
        for record_path in sorted(self.dir.glob("*.json")):
            uuid = record_path.stem
            with self._lock:
                if uuid in self._domains:
                    continue
            try:
                record = json.loads(record_path.read_text())
                config = DomainConfig.model_validate(record["config"])
                pid = int(record.get("pid", 0))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._log.warning("ignoring unreadable domain record %s: %s", record_path, exc)
                continue
            try:
                domain = self._attach(config)
            except DriverError as exc:
                if domproc.process_alive(pid, uuid):
                    self._log.warning(
                        "%s domain %s (pid %d) is alive but does not answer: %s", self.name, config.name, pid, exc
                    )
                else:
                    self._log.info("%s domain %s is gone; removing its files", self.name, config.name)
                    self._remove_files(uuid)
                continue
            with self._lock:
                self._domains[uuid] = domain
            self._log.info("found %s domain %s (%s), pid %d", self.name, config.name, uuid, domain.pid)

    def _remove_orphan_sockets(self) -> None:
        """Remove sockets without a record that nobody listens on any more."""
        for sock_path in self.dir.glob("*.sock"):
            if sock_path.with_suffix(".json").exists():
                continue
            client = domproc.DomainProcessClient(sock_path, timeout=1.0)
            try:
                client.connect()
            except DriverError:
                with contextlib.suppress(FileNotFoundError):
                    sock_path.unlink()
            finally:
                client.close()

    # ---------------------------------------------------------------- per-domain operations

    async def destroy_domain(self, domain: D, *, background: bool = False) -> None:
        if domain.destroyed:
            return
        domain.destroyed = True
        if domain._settling is not None:
            domain._settling.cancel()
        await asyncio.to_thread(self._destroy_sync, domain, background)

    def _destroy_sync(self, domain: D, background: bool = False) -> None:
        grace = 5.0
        stopping = False
        if domain.started:
            with contextlib.suppress(DriverError):
                _, fds = domain._client.call("shutdown", timeout=5.0)
                for fd in fds:
                    os.close(fd)
                stopping = True  # it answered: its guest is paused for good and the process is leaving
        else:
            grace = 0.0  # built paused and not up yet (or never): nothing in it to shut down
        if stopping and background:
            # Its exit (tearing down a mapping of all guest memory) and ours
            # (freeing that memory) take 0.2-0.5 s per GiB here: waited for in
            # the background, not on a migration's or a destroy's path.
            reaper = threading.Thread(target=self._reap, args=(domain, grace), name=f"reap-{domain.pid}", daemon=True)
            self._reapers.add(reaper)
            reaper.start()
        else:
            domproc.stop_process(domain.pid, marker=domain.config.uuid, popen=domain._popen, grace=grace)
            domain.detach()
        self._remove_files(domain.config.uuid)
        with self._lock:
            if self._domains.get(domain.config.uuid) is domain:
                del self._domains[domain.config.uuid]
        self._log.info("destroyed %s domain %s (%s)", self.name, domain.name, domain.config.uuid)

    def _reap(self, domain: D, grace: float) -> None:
        try:
            domproc.stop_process(domain.pid, marker=domain.config.uuid, popen=domain._popen, grace=grace)
            domain.detach()
        finally:
            self._reapers.discard(threading.current_thread())

    async def rename_domain(self, domain: D, new_name: str) -> None:
        if domain.destroyed:
            raise DriverError(f"domain {domain.name} has been destroyed")
        try:
            config = DomainConfig.model_validate({**domain.config.model_dump(), "name": new_name})
        except ValidationError:
            raise ConfigError(f"bad domain name {new_name!r}") from None
        with self._lock:
            for other in self._domains.values():
                if other is not domain and other.name == new_name:
                    raise DomainExists(f"domain {new_name} already exists")
            if new_name in self._claimed:
                raise DomainExists(f"domain {new_name} is being created")
        await asyncio.to_thread(self._write_record, config, domain.pid)
        domain.config = config
