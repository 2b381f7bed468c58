"""Domain network plumbing for the daemon: vifs follow their domain's life.

Only domains whose config has vifs on a bridge get any of this; everything is
best effort and logged, because a network problem must never undo a move
(a failed announce is reported in the migration result, not raised).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import structlog

from relocd.drivers.base import Domain
from relocd.engine.hooks import DomainHooks
from relocd.errors import RelocdError
from relocd.net import AnnounceConfig, announce_vif, attach_vif, detach_vif, set_link, vif_handle
from relocd.net.vif import VifHandle

log = structlog.get_logger("relocd.network")

#: How long RESUMED waits for the announce's first round (errors show there).
FIRST_ROUND_WAIT_S = 0.02


def netns_prefix_for(state_dir: Path) -> str:
    """A short, stable per-daemon prefix: two daemons on one machine never share a namespace."""
    return "rd" + hashlib.blake2s(str(state_dir.resolve()).encode(), digest_size=3).hexdigest()


class NetworkHooks(DomainHooks):
    def __init__(self, prefix: str, announce: AnnounceConfig) -> None:
        self.prefix = prefix
        self.announce = announce
        self._tasks: set[asyncio.Task[tuple[int, list[str]]]] = set()

    @staticmethod
    def _ours(domain: Domain) -> bool:
        """Only sim/kvm vifs are relocd's veth stand-ins; a Xen domain's vifs are
        its backend's (vif scripts plug vifD.N into the bridge), not ours to build."""
        return domain.emulated_vifs

    def _handles(self, domain: Domain) -> list[VifHandle]:
        if not self._ours(domain):
            return []
        return [vif_handle(domain.name, v, netns_prefix=self.prefix) for v in domain.config.vifs if v.bridge]

    async def attach(self, domain: Domain, *, up: bool) -> None:
        if not self._ours(domain):
            return
        for vif in domain.config.vifs:
            if not vif.bridge:
                continue
            try:
                await asyncio.to_thread(attach_vif, domain.name, vif, netns_prefix=self.prefix, up=up)
            except RelocdError as exc:
                log.warning("vif attach failed", domain=domain.name, mac=vif.mac, error=exc.message)
                raise

    async def _links(self, domain: Domain, up: bool) -> None:
        for h in self._handles(domain):
            try:
                await asyncio.to_thread(set_link, h, up)
            except (RelocdError, OSError) as exc:
                log.warning("vif link change failed", domain=domain.name, up=up, error=str(exc))

    async def paused(self, domain: Domain) -> None:
        await self._links(domain, False)

    async def resumed_here(self, domain: Domain) -> None:
        await self._links(domain, True)

    async def destroyed(self, domain: Domain) -> None:
        for h in self._handles(domain):
            try:
                await asyncio.to_thread(detach_vif, h)
            except (RelocdError, OSError) as exc:
                log.warning("vif detach failed", domain=domain.name, error=str(exc))

    async def before_resume(self, domain: Domain) -> None:
        await self.attach(domain, up=False)

    async def after_resume(self, domain: Domain) -> dict[str, object]:
        """Bring the links up and start the announce.

        The rounds take most of a second (QEMU's schedule); the source's copy
        waits paused for our RESUMED, so we answer as soon as the first round
        is out (which is where a missing bridge or a missing CAP_NET_RAW shows)
        and let the later rounds run on.
        """
        handles = self._handles(domain)
        if not handles:
            return {}
        await self._links(domain, True)
        task = asyncio.get_running_loop().create_task(self._announce_all(domain, handles))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        done, _ = await asyncio.wait({task}, timeout=FIRST_ROUND_WAIT_S)
        if done:
            sent, errors = task.result()
            return {"announce": {"frames_sent": sent, "errors": errors, "complete": True}}
        return {"announce": {"rounds": self.announce.rounds, "errors": [], "complete": False}}

    async def _announce_all(self, domain: Domain, handles: list[VifHandle]) -> tuple[int, list[str]]:
        sent = 0
        errors: list[str] = []
        for result in await asyncio.gather(*(announce_vif(h, self.announce) for h in handles)):
            sent += result.frames_sent
            errors.extend(result.errors)
        if errors:
            log.warning("announce incomplete", domain=domain.name, errors=errors)
        else:
            log.info("domain announced", domain=domain.name, frames=sent)
        return sent, errors
