"""A fake stream driver for engine and savefile tests: domains whose hypervisor moves memory itself.

It behaves as the xen driver does where the engine can tell (no Xen needed):
``send_stream`` runs relocd's policy round by round (live) and ends with the
domain suspended; a suspended domain comes back only through
``cancel_send()``, never ``resume()``; a failed send resumes the domain
itself (unless ``resumes_on_failure`` is off, as a driver that cannot);
``receive_stream`` refuses a name already present and builds the domain,
paused, from the chunks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from relocd.drivers.base import Domain, DomainConfig, DomainState, Driver, HostCaps
from relocd.engine.policy import PrecopyPolicy, RoundStats
from relocd.errors import DriverError

CHUNK = 64 << 10


@dataclasses.dataclass
class Decision:
    """What the xen driver's policy bridge reports for each round (on_round's argument)."""

    pages_sent: int
    bytes_sent: int
    duration_s: float
    dirty_pages: int
    stop_reason: str | None
    expected_downtime_ms: float | None = None


class StreamDomain(Domain):
    transfer: ClassVar[str] = "stream"

    def __init__(self, driver: StreamDriver, config: DomainConfig, image: bytes, running: bool) -> None:
        self.driver = driver
        self.config = config
        self.image = bytes(image)
        self._state = DomainState.RUNNING if running else DomainState.PAUSED
        self.suspended = False
        self.destroyed = False
        self.cancels = 0

    @property
    def state(self) -> DomainState:
        return self._state

    def memory(self) -> memoryview:
        raise DriverError("a stream domain has no flat memory")

    async def pause(self) -> None:
        self._state = DomainState.PAUSED

    async def resume(self) -> None:
        assert not self.suspended, "a suspended domain comes back with cancel_send()"
        self._state = DomainState.RUNNING

    async def undo_send(self) -> None:
        await self.cancel_send()

    async def destroy(self) -> None:
        self.destroyed = True
        self.driver.doms = [d for d in self.driver.doms if d is not self]

    async def rename(self, new_name: str) -> None:
        self.config = self.config.model_copy(update={"name": new_name})

    async def read_config(self) -> DomainConfig:
        """The whole config (the listing's is cheap, as the xen driver's)."""
        self.config = self.config.model_copy(update={"extra": {**self.config.extra, "whole": "yes"}})
        return self.config

    async def dirty_log_start(self) -> None:
        raise DriverError("no dirty log here")

    async def dirty_log_fetch(self) -> Any:
        raise DriverError("no dirty log here")

    async def dirty_log_stop(self) -> None:
        raise DriverError("no dirty log here")

    async def save_state(self) -> bytes:
        raise DriverError("state is in the stream")

    async def load_state(self, blob: bytes) -> None:
        raise DriverError("state is in the stream")

    async def send_stream(
        self,
        live: bool,
        policy: PrecopyPolicy,
        sink: Callable[[bytes], Awaitable[None]],
        on_round: Callable[[Decision], Awaitable[None]],
    ) -> list[Decision]:
        npages = len(self.image) // 4096
        try:
            if live:
                rnd, dirty = 0, npages
                while True:
                    rnd += 1
                    for off in range(0, dirty * 4096, CHUNK):
                        await sink(self.image[off : off + CHUNK])
                    dirty = max(1, dirty // 8)  # the guest dirties less each round
                    stats = RoundStats(rnd, npages, npages * 4096, npages * 4096, 0.01, dirty, npages)
                    reason = policy.should_stop(stats)
                    await on_round(Decision(npages, npages * 4096, 0.01, dirty, reason))
                    if reason is not None:
                        break
            self.suspended, self._state = True, DomainState.PAUSED
            for off in range(0, len(self.image), CHUNK):  # the final copy, state included
                await sink(self.image[off : off + CHUNK])
        except Exception as exc:  # noqa: BLE001 - whatever the sink raised, as the xen driver sees it
            if self.driver.resumes_on_failure:
                await self.cancel_send()
            raise DriverError(f"fake driver: the stream's receiver failed: {exc}") from None
        return []

    async def cancel_send(self) -> None:
        self.cancels += 1
        self.suspended, self._state = False, DomainState.RUNNING


class StreamDriver(Driver):
    transfer: ClassVar[str] = "stream"
    #: as Xen's: every daemon on the hypervisor sees every domain
    shared_hypervisor: ClassVar[bool] = True

    def __init__(self, name: str = "fakestream", state_dir: Path = Path("/nonexistent")) -> None:
        super().__init__(state_dir)
        self.name = name  # type: ignore[misc]
        self.doms: list[StreamDomain] = []
        self.builds = 0
        self.fail_build = False
        #: a driver that thinks it has the whole domain after one chunk
        self.finish_early = False
        self.resumes_on_failure = True
        self.received = b""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def domains(self) -> list[Domain]:
        return list(self.doms)

    async def create(self, config: DomainConfig, *, start: bool = True) -> Domain:
        image = (bytes(range(256)) * 16 * config.npages)[: config.memory_bytes]
        image = image[:-4096] + os.urandom(4096)  # every domain a little different
        dom = StreamDomain(self, config, image, running=start)
        self.doms.append(dom)
        return dom

    async def capabilities(self) -> HostCaps:
        return HostCaps(driver=self.name, free_memory_bytes=1 << 34, max_vcpus=8, bridges=frozenset({"xenbr0"}))

    async def receive_stream(self, config: DomainConfig, chunks: AsyncIterator[bytes], *, name: str) -> Domain:
        if any(d.name == name for d in self.doms):
            raise DriverError(f"domain {name} already exists")
        self.builds += 1
        data = bytearray()
        async for chunk in chunks:
            data += chunk
            if self.fail_build:
                raise DriverError("fake driver: restore failed")
            if self.finish_early:
                break
        self.received = bytes(data)
        image = bytes(data[-config.memory_bytes :])  # a live stream's last copy of memory
        dom = StreamDomain(self, config.model_copy(update={"name": name}), image, running=False)
        self.doms.append(dom)
        return dom
