"""Two sim hosts in one process for engine tests (a driver, a journal and a target context each), and a tapped channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from relocd.drivers.sim import SimDriver
from relocd.engine.journal import Journal
from relocd.engine.reservation import ReservationTable
from relocd.engine.stream import RecordChannel
from relocd.engine.target import TargetContext


class SimHost:
    """One host: its sim driver (guest memory in ``memory_dir`` when given), journal and target context."""

    def __init__(self, root: Path, name: str, *, memory_dir: Path | None = None) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.driver = SimDriver(self.dir, memory_dir=memory_dir)
        self.journal = Journal(self.dir / "journal.sqlite")
        self.ctx = TargetContext(drivers={"sim": self.driver}, reservations=ReservationTable(30), journal=self.journal)


@asynccontextmanager
async def sim_pair(root: Path, *, memory_dir: Path | None = None) -> AsyncIterator[tuple[SimHost, SimHost]]:
    """Hosts ``a`` and ``b``, started; every domain left is destroyed and both closed afterwards."""
    a, b = SimHost(root, "a", memory_dir=memory_dir), SimHost(root, "b", memory_dir=memory_dir)
    await a.driver.start()
    await b.driver.start()
    try:
        yield a, b
    finally:
        for h in (a, b):
            for d in h.driver.domains():
                await d.destroy()
            await h.driver.close()
            h.journal.close()


class TappedChannel(RecordChannel):
    """The target's channel, keeping every record it received: what crossed the wire, as parsed."""

    def __init__(self, *args: Any, received: list[object], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received = received

    async def recv(self) -> object:
        record = await super().recv()
        self.received.append(record)
        return record
