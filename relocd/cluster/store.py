"""What relocd needs of a cluster store: a few keys, compare-and-swap, leases.

One small interface so the ownership logic is tested against an in-memory
store (tests/unit/fakestore.py) and runs against etcd (``etcd.py``) alike.
Every write is a swap on the ``mod_revision`` the writer last read (0: the
key must not exist), so two writers never both win.
"""

from __future__ import annotations

import abc
import dataclasses

from relocd.errors import RelocdError

#: every key relocd writes lives under this prefix
PREFIX = "/relocd/"
DOMAINS = PREFIX + "domains/"
HOSTS = PREFIX + "hosts/"


class StoreUnavailable(RelocdError):
    """The cluster store did not answer (every endpoint tried): nothing is known of the write."""


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    #: etcd's revision of the key's last write (what a swap compares)
    mod_revision: int


class Store(abc.ABC):
    """A cluster store as relocd uses it."""

    #: how operators name it in messages (``etcd://h1:2379,h2:2379``)
    url: str = "store"

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def swap(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        """Write ``value`` if the key's mod_revision is still ``mod_revision`` (0: absent)."""

    @abc.abstractmethod
    async def delete(self, key: str, *, mod_revision: int) -> bool:
        """Remove the key if its mod_revision is still ``mod_revision``."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[Entry]: ...

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> None:
        """Unconditional write (the registry's own key only)."""

    @abc.abstractmethod
    async def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id."""

    @abc.abstractmethod
    async def keepalive(self, lease: int) -> bool:
        """Renew a lease; False once it has expired."""

    async def revoke(self, lease: int) -> None:
        """End a lease now (its keys go); best effort."""

    async def close(self) -> None:
        """Release connections."""
