"""The relocation listener: bind where the config says, admit whom it allows.

Access control happens before a single byte from the peer is read: the
peer's address (then, if needed, its forward-confirmed reverse DNS name) is
checked against hosts-allow; a refused peer is logged, reported to
``on_refused`` (the metrics count it by reason) and its socket closed
unread.  DNS runs on the loop's resolver with a timeout, so one slow lookup
never holds up other connections.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import structlog

from relocd.errors import ConfigError
from relocd.server.access import HostsAllow, is_ip, normalize_ip, peer_allowed

log = structlog.get_logger("relocd.listener")

Handler = Callable[[socket.socket, str], Awaitable[None]]
#: told why a peer was turned away: "hosts_allow", "too_many_connections" (metrics)
RefusalCallback = Callable[[str], None]


def bind_socket(address: str, port: int) -> socket.socket:
    """A listening socket per xend-relocation-address: '', an IP, or an interface name."""
    device: str | None = None
    if address == "":
        host, family = "::", socket.AF_INET6
        if not socket.has_ipv6:
            host, family = "0.0.0.0", socket.AF_INET
    elif is_ip(address):
        host = address
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
    else:
        try:
            socket.if_nametoindex(address)
        except OSError:
            raise ConfigError(f"xend-relocation-address: no such address or interface: {address!r}") from None
        device, host, family = address, "::", socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
            except OSError:
                pass
        if device is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def normalise_ip(ip: str) -> str:
    """'::ffff:1.2.3.4' -> '1.2.3.4'; scope ids dropped; text that is no address as it is."""
    try:
        return normalize_ip(ip)
    except ValueError:
        return ip.split("%", 1)[0]


class RelocationListener:
    """Accepts peers on one socket and hands admitted ones to the handler."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        *,
        hosts_allow: HostsAllow,
        dns_timeout: float,
        max_connections: int,
        name: str = "relocation",
        on_refused: RefusalCallback | None = None,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.allow = hosts_allow
        self.dns_timeout = dns_timeout
        self.max_connections = max_connections
        self.name = name
        self.on_refused = on_refused
        self.tasks: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                log.error("accept failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            peer = normalise_ip(str(addr[0]))
            if len(self.tasks) >= self.max_connections:
                log.warning("connection refused: too many connections", peer=peer, limit=self.max_connections)
                conn.close()
                self._refused("too_many_connections")
                continue
            task = loop.create_task(self._admit(conn, peer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _admit(self, conn: socket.socket, peer: str) -> None:
        try:
            allowed, name = await peer_allowed(peer, self.allow, self.dns_timeout)
            if not allowed:
                log.warning("connection refused by hosts-allow", peer=peer, listener=self.name)
                self._refused("hosts_allow")
                return
            log.info("connection accepted", peer=peer, name=name, listener=self.name)
            await self.handler(conn, peer)
        except asyncio.CancelledError:
            raise
        except Exception:  # one connection never takes the daemon down
            log.exception("connection handler crashed", peer=peer)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(reason)
            except Exception:  # a counter must not stop the accept loop
                log.exception("refusal callback failed", reason=reason)

    async def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            try:
                await self._accept_task
            except asyncio.CancelledError:
                pass
            self._accept_task = None
        self.sock.close()

    async def drain(self, grace: float) -> None:
        """Let live connections finish for up to ``grace`` seconds, then cancel them."""
        if not self.tasks:
            return
        _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
