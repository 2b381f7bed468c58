"""An in-memory cluster store for unit tests, with the two faults docs/cluster.md names.

``down``: every call raises StoreUnavailable (nothing applied).  ``slow``:
the next N swaps are applied, then raise StoreUnavailable (the answer lost).
"""

from __future__ import annotations

from relocd.cluster.store import Entry, Store, StoreUnavailable


class MemoryStore(Store):
    url = "memory://"

    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.revision = 0
        self.down = False
        self.slow = 0
        self.leases: dict[int, list[str]] = {}
        self.swaps = 0
        #: leases granted so far (ids are never reused)
        self.granted = 0

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("cluster store unreachable (memory://): down")

    def _write(self, key: str, value: bytes, lease: int) -> None:
        self.revision += 1
        self.data[key] = Entry(key, value, self.revision)
        if lease:
            self.leases.setdefault(lease, []).append(key)

    async def get(self, key: str) -> Entry | None:
        self._check()
        return self.data.get(key)

    async def swap(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        self._check()
        self.swaps += 1
        current = self.data.get(key)
        ok = (current.mod_revision if current else 0) == mod_revision
        if ok:
            self._write(key, value, lease)
        if self.slow:
            self.slow -= 1
            raise StoreUnavailable("cluster store unreachable (memory://): timed out")
        return ok

    async def delete(self, key: str, *, mod_revision: int) -> bool:
        self._check()
        current = self.data.get(key)
        ok = current is not None and current.mod_revision == mod_revision
        if ok:
            self.revision += 1
            del self.data[key]
        if self.slow:
            self.slow -= 1
            raise StoreUnavailable("cluster store unreachable (memory://): timed out")
        return ok

    async def list(self, prefix: str) -> list[Entry]:
        self._check()
        return [e for k, e in sorted(self.data.items()) if k.startswith(prefix)]

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> None:
        self._check()
        self._write(key, value, lease)

    async def grant(self, ttl_s: int) -> int:
        self._check()
        self.granted += 1
        lease = self.granted
        self.leases[lease] = []
        return lease

    async def keepalive(self, lease: int) -> bool:
        self._check()
        return lease in self.leases

    async def revoke(self, lease: int) -> None:
        for key in self.leases.pop(lease, []):
            self.data.pop(key, None)

    def expire(self, lease: int) -> None:
        for key in self.leases.pop(lease, []):
            self.data.pop(key, None)
