"""The one interface every hypervisor driver implements.

The engine moves domains through this seam and never learns which hypervisor
is underneath.  It was shaped for three back ends:

* ``sim``: a process per domain whose memory is a memfd shared with the daemon,
* ``kvm``: a micro-VMM process per VM, guest memory a memfd, KVM's dirty log,
* ``xen``: libxenctrl/libxl, foreign mappings and Xen's log-dirty bitmap.

Memory is exposed as a writable memoryview over the whole guest (zero-copy
where the driver can), dirty logs as bitmaps of little-endian uint64 words
(bit ``i`` of word ``i // 64`` is page ``i``, KVM's layout), and vCPU/device
state as an opaque, driver-versioned blob that only the same driver reads back.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import enum
import os
import stat
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from relocd.errors import DriverError
from relocd.units import PAGE_SIZE

if TYPE_CHECKING:
    from relocd.engine.policy import PrecopyPolicy

DirtyBitmap = npt.NDArray[np.uint64]

#: Names the daemon gives a domain while it moves (as xend did).
INCOMING_SUFFIX = "--incoming"
MIGRATED_AWAY_SUFFIX = "--migratedaway"
#: longest domain name an operator may give
MAX_NAME = 64


class DomainState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"  # being sent (shown as migrating-NAME)
    INCOMING = "incoming"  # being received
    SAVED = "saved"


class Vif(BaseModel):
    """One network interface, as in a Xen ``vif = [...]`` entry."""

    model_config = ConfigDict(frozen=True)

    mac: str
    ips: tuple[str, ...] = ()
    bridge: str | None = None


class DomainConfig(BaseModel):
    """Everything needed to build a domain; travels in the stream as sxp."""

    model_config = ConfigDict(frozen=True)

    #: an operator's names are at most MAX_NAME long; the extra room is for
    #: the ``--incoming`` / ``--migratedaway`` marks a move adds
    name: str = Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.:-]+$")
    uuid: str = Field(default_factory=lambda: str(uuidlib.uuid4()))
    memory_mib: int = Field(ge=1, le=1 << 22)
    vcpus: int = Field(default=1, ge=1, le=512)
    driver: str = "sim"
    workload: str = "idle"
    vifs: tuple[Vif, ...] = ()
    cpu_features: tuple[str, ...] = ()
    #: the block devices or files backing the domain's disks, as absolute
    #: paths on its host (the driver fills them from its own config; sim and
    #: kvm domains have none).  RESERVE carries them and the target checks it
    #: can open each (``Driver.unreachable_disks``); they are not part of
    #: the sxp config (a Xen domain's travel in its libxl JSON, in ``extra``)
    disks: tuple[str, ...] = ()
    extra: dict[str, str] = Field(default_factory=dict)

    @field_validator("uuid")
    @classmethod
    def _uuid_ok(cls, v: str) -> str:
        return str(uuidlib.UUID(v))

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib << 20

    @property
    def npages(self) -> int:
        return self.memory_bytes // PAGE_SIZE


class HostCaps(BaseModel):
    """What a host can give a domain; the target's half of a reservation."""

    model_config = ConfigDict(frozen=True)

    driver: str
    free_memory_bytes: int
    max_vcpus: int
    cpu_features: frozenset[str] = frozenset()
    bridges: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class ForeignImage:
    """A save image a hypervisor's own toolstack wrote (e.g. ``xl save``), as its driver package reads it.

    relocd restores it without a relocd savefile around it: bytes
    ``stream_start .. stream_end`` of the file are the driver's own stream,
    which ``Driver.receive_stream`` (a stream driver's) builds the domain
    from, and ``config`` is what the image says about the domain.
    """

    #: the driver that restores it, e.g. "xen"
    driver: str
    #: what it is and where it restores, for messages: "an xl save image", "a Xen host"
    kind: str
    host: str
    config: DomainConfig
    stream_start: int
    stream_end: int


#: How a domain's state travels (``Domain.transfer``, ``Driver.transfer``).
#: PAGES: the engine reads ``memory()`` and the dirty log and sends pages
#: itself.  STREAM: the hypervisor must do it (a Xen PV guest's page tables
#: hold machine frames only Xen can translate): the domain offers
#: ``send_stream`` and its driver ``receive_stream``.  engine/transfer.py
#: holds one object per kind; nothing above drivers/ asks which it has.
PAGES = "pages"
STREAM = "stream"


@dataclasses.dataclass(frozen=True)
class RoundDecision:
    """One precopy round of a stream send as relocd saw it, and what its policy said."""

    round: int
    pages_sent: int
    bytes_sent: int
    total_bytes_sent: int
    duration_s: float
    dirty_pages: int
    stop_reason: str | None
    expected_downtime_ms: float | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


StreamSink = Callable[[bytes], Coroutine[Any, Any, None]]
RoundReportSink = Callable[[RoundDecision], Coroutine[Any, Any, None]]


class Domain(abc.ABC):
    """A handle on one domain.  Methods that may block are async."""

    config: DomainConfig
    #: how its state travels: PAGES or STREAM (see above)
    transfer: ClassVar[str] = PAGES
    #: its vifs are relocd's veth + namespace stand-ins (sim, kvm), which
    #: relocd builds and moves; a Xen domain's are its backend's
    emulated_vifs: ClassVar[bool] = True
    #: ``throttle`` can slow the guest down (auto-converge, engine/converge.py)
    throttles: ClassVar[bool] = False

    async def read_config(self) -> DomainConfig:
        """The whole config the CONFIG record carries.

        A stream driver lists its domains cheaply (no boot details, e.g.
        Xen's xenstore view) and reads the rest here.
        """
        return self.config

    async def send_stream(
        self, live: bool, policy: PrecopyPolicy, sink: StreamSink, on_round: RoundReportSink | None = None
    ) -> list[RoundDecision]:
        """STREAM domains: the hypervisor's own save into ``sink``, rounds decided by ``policy``.

        Leaves the domain suspended (``undo_send`` brings it back).
        """
        raise DriverError(f"{self.config.driver} domains move as pages, not as a hypervisor stream")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def npages(self) -> int:
        return self.config.npages

    @property
    @abc.abstractmethod
    def state(self) -> DomainState:
        """RUNNING or PAUSED from the driver's point of view."""

    @abc.abstractmethod
    def memory(self) -> memoryview:
        """Writable, zero-copy view of all guest memory (``npages * PAGE_SIZE`` bytes, format 'B')."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop the guest; when this returns no further write lands in memory."""

    @abc.abstractmethod
    async def resume(self) -> None: ...

    async def undo_send(self) -> None:
        """Roll back an outgoing send before GO: the domain runs here again.

        For a paged domain that is a resume if the send paused it.  A driver
        whose send does more (a Xen guest suspended by its save) overrides
        this with its own undo; the engine never asks which it has.
        """
        if self.state == DomainState.PAUSED:
            await self.resume()

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Stop the guest and free its memory; idempotent."""

    async def discard(self) -> None:
        """A copy nobody needs any more (handed over, or saved): gone for good once this returns.

        Like ``destroy``, except that a driver may finish freeing what the
        copy held (its process's exit, its memory) in the background, off the
        migration's or the save's path.  The default is ``destroy``.
        """
        await self.destroy()

    @abc.abstractmethod
    async def rename(self, new_name: str) -> None: ...

    async def throttle(self, fraction: float) -> None:
        """Let the guest run only ``1 - fraction`` of the time (0.0: full speed).

        Auto-converge's lever on a guest that dirties memory faster than the
        link carries it.  Drivers that can (``throttles``) override it; the
        rest keep the guest at full speed.
        """

    @abc.abstractmethod
    async def dirty_log_start(self) -> None:
        """Start logging writes; every page counts as clean from here."""

    @abc.abstractmethod
    async def dirty_log_fetch(self) -> DirtyBitmap:
        """Return the pages written since the last fetch (or start) and clear the log atomically."""

    @abc.abstractmethod
    async def dirty_log_stop(self) -> None: ...

    @abc.abstractmethod
    async def save_state(self) -> bytes:
        """vCPU and device state of a paused domain, as an opaque versioned blob."""

    @abc.abstractmethod
    async def load_state(self, blob: bytes) -> None:
        """Load state saved by ``save_state`` (same driver) into a paused, not yet started domain.

        Process-based drivers first wait for guest memory populated in the
        background (``create(start=False)``) and raise DriverError if some of
        it could not be had: before the target says PREPARED.
        """

    async def configure(self, config: DomainConfig) -> None:
        """Adopt the full config of a domain built with ``start=False`` before it runs.

        A target builds the incoming domain when it grants the reservation
        (so the memory is really set aside before the source commits to
        anything) but learns the domain's full configuration only from the
        CONFIG record after that.  Identity and size never change here.
        """
        old = self.config
        if (config.uuid, config.memory_mib, config.vcpus, config.driver) != (
            old.uuid,
            old.memory_mib,
            old.vcpus,
            old.driver,
        ):
            raise DriverError(f"configure cannot change the identity or size of {old.name}")
        self.config = config.model_copy(update={"name": old.name})

    async def stats(self) -> dict[str, Any]:
        """Guest progress counters (workload ticks, pages written); driver-specific."""
        return {}

    async def check_invariant(self) -> str | None:
        """Check the guest's own page invariant; None if it holds, else what is wrong.

        Drivers whose guests carry no invariant return None.
        """
        return None


class Driver(abc.ABC):
    """A hypervisor on this host."""

    name: ClassVar[str]
    #: PAGES or STREAM, as for its domains (see Domain.transfer)
    transfer: ClassVar[str] = PAGES
    #: its domains are seen by every daemon on this hypervisor (two relocd
    #: daemons in one Xen dom0): the source's own copy is then no name clash
    shared_hypervisor: ClassVar[bool] = False

    async def receive_stream(self, config: DomainConfig, chunks: AsyncIterator[bytes], *, name: str) -> Domain:
        """STREAM drivers: build the domain, paused, as ``name``, from a ``send_stream``'s chunks."""
        raise DriverError(f"the {self.name} driver receives pages, not a hypervisor stream")

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @abc.abstractmethod
    async def start(self) -> None:
        """Find the domains that survived a daemon restart."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Let go of domains without stopping them (daemon shutdown)."""

    @abc.abstractmethod
    def domains(self) -> list[Domain]: ...

    def lookup(self, name: str) -> Domain | None:
        for d in self.domains():
            if d.name == name:
                return d
        return None

    def lookup_uuid(self, uuid: str) -> Domain | None:
        for d in self.domains():
            if d.config.uuid == uuid:
                return d
        return None

    @abc.abstractmethod
    async def create(self, config: DomainConfig, *, start: bool = True) -> Domain:
        """Build a domain.

        ``start=True`` boots it (the guest initialises its memory and runs its
        workload).  ``start=False`` builds it paused with empty (zero) memory,
        waiting for pages and ``load_state`` (incoming migration, restore).
        It returns without populating that memory (a target's reservation must
        not grow with the guest's size): a driver may populate it in the
        background while pages stream in, and ``load_state`` fails
        (DriverError) if the memory turns out not to be there.
        """

    @abc.abstractmethod
    async def capabilities(self) -> HostCaps: ...

    async def unreachable_disks(self, disks: Sequence[str]) -> list[str]:
        """Which of a domain's disks this host cannot open, each as ``PATH (why)``; [] when all can.

        A disk is reachable when it exists as a block device or a regular
        file and opens for reading.  Opened non-blocking, so a FIFO or a
        device that waits for a carrier cannot hang a reservation.  A driver
        whose disks are not local paths (network storage a script attaches)
        overrides this.
        """

        def why_not(path: str) -> str | None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as exc:
                return exc.strerror or type(exc).__name__
            try:
                mode = os.fstat(fd).st_mode
            finally:
                os.close(fd)
            return None if stat.S_ISBLK(mode) or stat.S_ISREG(mode) else "not a block device or file"

        def check() -> list[str]:
            return [f"{d} ({why})" for d in disks if (why := why_not(d)) is not None]

        return await asyncio.to_thread(check) if disks else []
