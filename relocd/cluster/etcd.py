"""An etcd v3 client over etcd's JSON gateway (``POST /v3/kv/txn``), on asyncio streams.

Why not a library: relocd needs six calls (range, txn, put, lease grant,
keepalive, revoke), and the asyncio etcd clients on PyPI either speak gRPC (a large
dependency, protobuf stubs pinned to an etcd version) or are unmaintained.
The JSON gateway is part of every etcd since 3.3 (``/v3/`` paths from 3.4,
the Debian version), takes base64 keys and values and int64s as strings.
One HTTP/1.1 request per connection (``Connection: close``): no pool to go
stale when a member dies, and a member that does not answer within
``timeout_s`` is skipped for the next endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

import structlog

from relocd.cluster.store import Entry, Store, StoreUnavailable
from relocd.errors import ConfigError

log = structlog.get_logger("relocd.etcd")

#: the most an answer may hold (a listing of every domain and host fits easily)
MAX_RESPONSE = 16 << 20
#: a call whose every endpoint failed is tried again for this many timeouts (an election)
RETRY_TIMEOUTS = 3
RETRY_PAUSE_S = 0.2


def parse_store_url(url: str) -> tuple[bool, list[tuple[str, int]]]:
    """``etcd://h1:2379,h2:2379`` (or ``etcds://`` for TLS) -> (tls, endpoints)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("etcd", "etcds"):
        raise ConfigError(f"cluster store {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
    endpoints = []
    for part in rest.rstrip("/").split(","):
        split = urlsplit("//" + part.strip())
        try:
            port = split.port or 2379
        except ValueError:
            raise ConfigError(f"cluster store {url!r}: bad port in {part!r}") from None
        if not split.hostname:
            raise ConfigError(f"cluster store {url!r}: no host in {part!r}")
        endpoints.append((split.hostname, port))
    return scheme == "etcds", endpoints


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


def _entry(kv: dict[str, Any]) -> Entry:
    return Entry(
        key=base64.b64decode(kv["key"]).decode(),
        value=base64.b64decode(kv.get("value", "")),
        mod_revision=int(kv.get("mod_revision", 0)),
    )


class EtcdStore(Store):
    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        tls, self.endpoints = parse_store_url(url)
        self.url = url
        if tls and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        #: the endpoint that answered last is asked first
        self._first = 0

    # -- transport --------------------------------------------------------------

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one gateway call, trying each endpoint in turn; StoreUnavailable if none answers."""
        errors: dict[str, str] = {}
        n = len(self.endpoints)
        # An election after a member dies takes a second or two: a whole
        # pass of failures is tried again for RETRY_TIMEOUTS timeouts.
        give_up = asyncio.get_running_loop().time() + self.timeout_s * RETRY_TIMEOUTS
        while True:
            for i in range(n):
                index = (self._first + i) % n
                host, port = self.endpoints[index]
                try:
                    async with asyncio.timeout(self.timeout_s):
                        answer = await self._post(host, port, path, body)
                except (OSError, TimeoutError, ValueError, ssl.SSLError) as exc:
                    errors[f"{host}:{port}"] = str(exc) or type(exc).__name__
                    continue
                self._first = index
                return answer
            if asyncio.get_running_loop().time() >= give_up:
                break
            await asyncio.sleep(RETRY_PAUSE_S)
        why = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise StoreUnavailable(f"cluster store unreachable ({self.url}): {why}")

    async def _post(self, host: str, port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(body).encode()
        reader, writer = await asyncio.open_connection(
            host, port, ssl=self.ssl_context, server_hostname=host if self.ssl_context else None
        )
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
            )
            await writer.drain()
            status = await reader.readline()
            parts = status.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise ValueError(f"not an HTTP answer: {status[:60]!r}")
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            data = await self._body(reader, headers)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass
        code = int(parts[1])
        try:
            answer = json.loads(data) if data else {}
        except json.JSONDecodeError:
            raise ValueError(f"HTTP {code}: not JSON") from None
        if code != 200:
            raise ValueError(f"HTTP {code}: {answer.get('error') or answer.get('message') or data[:80]!r}")
        if not isinstance(answer, dict):
            raise ValueError("answer is not a JSON object")
        return answer

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            length = int(headers["content-length"])
            if length > MAX_RESPONSE:
                raise ValueError("answer too large")
            return await reader.readexactly(length)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            # A streaming call (lease keepalive) answers in chunks: its first
            # whole JSON object is the answer.
            data = b""
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0 or len(data) + size > MAX_RESPONSE:
                    return data
                data += await reader.readexactly(size)
                await reader.readline()
                try:
                    json.loads(data)
                    return data
                except json.JSONDecodeError:
                    continue
        return await reader.read(MAX_RESPONSE)

    # -- Store ------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        answer = await self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        return _entry(kvs[0]) if kvs else None

    async def list(self, prefix: str) -> list[Entry]:
        answer = await self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [_entry(kv) for kv in answer.get("kvs") or []]

    async def swap(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        k = _b64(key)
        compare = (
            {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
            if mod_revision == 0
            else {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}
        )
        put: dict[str, Any] = {"key": k, "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        answer = await self.call("/v3/kv/txn", {"compare": [compare], "success": [{"request_put": put}]})
        return bool(answer.get("succeeded", False))

    async def delete(self, key: str, *, mod_revision: int) -> bool:
        k = _b64(key)
        compare = {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}
        answer = await self.call("/v3/kv/txn", {"compare": [compare], "success": [{"request_delete_range": {"key": k}}]})
        return bool(answer.get("succeeded", False))

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        await self.call("/v3/kv/put", body)

    async def grant(self, ttl_s: int) -> int:
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> bool:
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0)) > 0

    async def revoke(self, lease: int) -> None:
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except StoreUnavailable:
            pass


def store_from_settings(s: Any) -> EtcdStore | None:
    """relocd-cluster-store and its TLS files (a Settings); None when unset.  ConfigError: a bad file."""
    if s.cluster_store is None:
        return None
    ctx = None
    if s.cluster_ca_file is not None or s.cluster_cert_file is not None or s.cluster_store.startswith("etcds://"):
        try:
            ctx = ssl.create_default_context(cafile=str(s.cluster_ca_file) if s.cluster_ca_file else None)
            if s.cluster_cert_file is not None:
                ctx.load_cert_chain(str(s.cluster_cert_file), str(s.cluster_key_file) if s.cluster_key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"relocd-cluster TLS files: {exc}") from None
    return EtcdStore(s.cluster_store, ssl_context=ctx, timeout_s=s.cluster_timeout)
