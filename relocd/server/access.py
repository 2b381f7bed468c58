"""Who may connect to the relocation port: xend's hosts-allow, fixed.

xend matched each ``xend-relocation-hosts-allow`` regex (``re.match``, so
anchored at the start only) against the peer's IP address and against
``socket.getfqdn(ip)``.  relocd keeps that rule and fixes what was wrong:

* xend split the option on single spaces, so a double space produced an empty
  regex that matches everything; here empty pieces are dropped.  An empty
  list still means everyone, as in xend.
* xend trusted whatever the reverse DNS said; here a name counts only if it
  resolves forward to the peer's own address, and a "name" that is itself an
  IP address never counts.
* xend's lookups blocked the whole server; here they run in the resolver
  threads of the event loop under a timeout, and only when the address alone
  did not match.
* IPv6 peers are handled; ``::ffff:1.2.3.4`` is matched as ``1.2.3.4``.

Names are matched case-insensitively, without a trailing dot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Sequence

from relocd.errors import ConfigError

__all__ = ["HostsAllow", "peer_allowed", "normalize_ip", "reverse_lookup", "forward_lookup"]


class HostsAllow:
    """The compiled ``xend-relocation-hosts-allow`` patterns."""

    def __init__(self, patterns: Sequence[str]) -> None:
        pieces = [p for item in patterns for p in item.split()]
        try:
            self.patterns = tuple(re.compile(p, re.IGNORECASE) for p in pieces)
        except re.error as e:
            raise ConfigError(f"xend-relocation-hosts-allow: bad regular expression: {e}") from None

    @classmethod
    def from_text(cls, text: str) -> HostsAllow:
        """From the option's text: regexes separated by whitespace."""
        return cls(text.split())

    @property
    def allows_everyone(self) -> bool:
        return not self.patterns

    def matches(self, text: str) -> bool:
        """Whether some pattern matches ``text`` from its start (``re.match``, as xend)."""
        return any(p.match(text) for p in self.patterns)

    def __repr__(self) -> str:
        return f"HostsAllow({[p.pattern for p in self.patterns]!r})"


def normalize_ip(ip: str) -> str:
    """Canonical text of an address: compressed IPv6, IPv4-mapped as IPv4, no scope.

    Raises ValueError for text that is not an IP address.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def is_ip(text: str) -> bool:
    """Is this an IP address (a scope suffix allowed), rather than a name?"""
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def reverse_lookup(ip: str) -> str:
    """The PTR name of ``ip``; raises OSError when it has none.  Tests replace this."""
    loop = asyncio.get_running_loop()
    host, _port = await loop.getnameinfo((ip, 0), socket.NI_NAMEREQD)
    return host


async def forward_lookup(name: str) -> list[str]:
    """Every address ``name`` resolves to (A and AAAA).  Tests replace this."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def _confirmed_name(ip: str, allow: HostsAllow) -> str | None:
    """The peer's reverse name if a pattern matches it and it resolves back to ``ip``."""
    name = (await reverse_lookup(ip)).rstrip(".")
    if not name or is_ip(name) or not allow.matches(name):
        return None
    for addr in await forward_lookup(name):
        try:
            if normalize_ip(addr) == ip:
                return name
        except ValueError:
            continue
    return None


async def peer_allowed(ip: str, allow: HostsAllow, dns_timeout: float) -> tuple[bool, str | None]:
    """Decide whether the peer at ``ip`` may talk to us.

    Returns ``(allowed, name)`` where ``name`` is the forward-confirmed DNS
    name that matched, or None when the address itself matched (or everyone
    is allowed).  No DNS query is made unless the address alone is refused.
    DNS failures and timeouts refuse the peer.
    """
    if allow.allows_everyone:
        return True, None
    try:
        ip = normalize_ip(ip)
    except ValueError:
        return False, None
    if allow.matches(ip):
        return True, None
    try:
        async with asyncio.timeout(dns_timeout):
            name = await _confirmed_name(ip, allow)
    except (TimeoutError, OSError, UnicodeError, ValueError):
        return False, None
    return (True, name) if name is not None else (False, None)
