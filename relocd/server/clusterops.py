"""Control-socket ops `cluster_hosts` and `cluster_domains`: the fleet as the cluster store holds it.

Read from any host: every daemon registered under its lease, and every
ownership record.  Reads only; they never decide a handoff.  A host with
no store, or a store that does not answer, gets one line saying so.
"""

from __future__ import annotations

from typing import Any

from relocd.cluster.ownership import Ownership
from relocd.cluster.registry import list_domains, list_hosts
from relocd.engine.host import Host
from relocd.errors import RelocdError


class NoClusterStore(RelocdError):
    """`relocd cluster` on a host whose config names no store."""


def cluster_of(host: Host) -> Ownership:
    if host.cluster is None:
        raise NoClusterStore("no cluster store configured on this host (set relocd-cluster-store; docs/cluster.md)")
    return host.cluster


async def hosts(host: Host, args: dict[str, Any], sink: Any) -> list[dict[str, Any]]:
    """Every daemon registered under a live lease; ``self`` marks this one."""
    own = cluster_of(host)
    found = await list_hosts(own.store)  # StoreUnavailable: its one line
    return [{**h, "self": h.get("name") == own.me} for h in found]


async def domains(host: Host, args: dict[str, Any], sink: Any) -> list[dict[str, Any]]:
    """Every ownership record: uuid, name, owning host, epoch, state, last migration."""
    return await list_domains(cluster_of(host).store)
