"""hosts-allow decisions: xend's matching rule, its quirks fixed, DNS faked."""

from __future__ import annotations

import asyncio
import time

import pytest

from relocd.errors import ConfigError
from relocd.server import access
from relocd.server.access import HostsAllow, normalize_ip, peer_allowed


class FakeDns:
    """Reverse and forward tables; counts queries; optionally hangs."""

    def __init__(
        self,
        ptr: dict[str, str] | None = None,
        addrs: dict[str, list[str]] | None = None,
        hang: bool = False,
    ) -> None:
        self.ptr = ptr or {}
        self.addrs = addrs or {}
        self.hang = hang
        self.queries: list[str] = []

    async def reverse(self, ip: str) -> str:
        self.queries.append(f"PTR {ip}")
        if self.hang:
            await asyncio.sleep(3600)
        if ip not in self.ptr:
            raise OSError("no PTR record")
        return self.ptr[ip]

    async def forward(self, name: str) -> list[str]:
        self.queries.append(f"A {name}")
        if name not in self.addrs:
            raise OSError("no such name")
        return self.addrs[name]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    monkeypatch.setattr(access, "reverse_lookup", fake.reverse)
    monkeypatch.setattr(access, "forward_lookup", fake.forward)
    return fake


# --- matching -----------------------------------------------------------------


def test_empty_list_allows_everyone() -> None:
    assert HostsAllow([]).allows_everyone
    assert HostsAllow(["", "  "]).allows_everyone
    assert not HostsAllow(["^a$"]).allows_everyone


def test_match_is_anchored_at_start_only_as_in_xend() -> None:
    allow = HostsAllow([r"^10\.0\.0\.1", r"trusted\.example\.org$"])
    assert allow.matches("10.0.0.1")
    assert allow.matches("10.0.0.17")  # not anchored with $: the reason check-config warns
    assert allow.matches("trusted.example.org")
    assert not allow.matches("www.trusted.example.org")  # re.match: start is implied
    assert not allow.matches("110.0.0.1")


def test_double_space_is_not_allow_all() -> None:
    # xend: '^a$  ^b$'.split(" ") == ['^a$', '', '^b$'], and re.compile('') matches anything.
    allow = HostsAllow.from_text(r"^a\.example$  ^b\.example$ ")
    assert [p.pattern for p in allow.patterns] == [r"^a\.example$", r"^b\.example$"]
    assert not allow.allows_everyone
    assert not allow.matches("evil.example")
    assert allow.matches("b.example")


def test_patterns_with_spaces_inside_a_sequence_item_are_split() -> None:
    assert [p.pattern for p in HostsAllow(["^a$ ^b$", "^c$"]).patterns] == ["^a$", "^b$", "^c$"]


def test_names_match_case_insensitively() -> None:
    assert HostsAllow([r"^host\.example\.org$"]).matches("HOST.Example.ORG")


def test_bad_pattern_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bad regular expression"):
        HostsAllow(["^ok$", "(unclosed"])


@pytest.mark.parametrize(
    ("ip", "normal"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("::ffff:10.0.0.5", "10.0.0.5"),
        ("::FFFF:0a00:0005", "10.0.0.5"),
        ("FD00:0:0::0005", "fd00::5"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_normalize_ip(ip: str, normal: str) -> None:
    assert normalize_ip(ip) == normal


# --- decisions without DNS ------------------------------------------------------


async def test_everyone_allowed_makes_no_query(dns: FakeDns) -> None:
    assert await peer_allowed("192.0.2.1", HostsAllow([]), 1.0) == (True, None)
    assert dns.queries == []


async def test_ip_match_makes_no_query(dns: FakeDns) -> None:
    allow = HostsAllow([r"^192\.0\.2\.1$"])
    assert await peer_allowed("192.0.2.1", allow, 1.0) == (True, None)
    assert dns.queries == []


async def test_ipv4_mapped_peer_matches_ipv4_pattern(dns: FakeDns) -> None:
    allow = HostsAllow([r"^192\.0\.2\.1$"])
    assert await peer_allowed("::ffff:192.0.2.1", allow, 1.0) == (True, None)
    assert dns.queries == []


async def test_ipv6_peer(dns: FakeDns) -> None:
    allow = HostsAllow([r"^fd00::", r"^2001:db8::1$"])
    assert await peer_allowed("fd00:0:0:0::17", allow, 1.0) == (True, None)
    assert await peer_allowed("2001:DB8:0::1", allow, 1.0) == (True, None)
    assert (await peer_allowed("2001:db8::2", allow, 1.0))[0] is False


async def test_not_an_ip_is_refused(dns: FakeDns) -> None:
    assert await peer_allowed("not-an-ip", HostsAllow([".*"]), 1.0) == (False, None)
    assert await peer_allowed("not-an-ip", HostsAllow(["^x$"]), 1.0) == (False, None)
    assert dns.queries == []


# --- decisions with DNS ----------------------------------------------------------


async def test_confirmed_name_is_allowed(dns: FakeDns) -> None:
    dns.ptr["192.0.2.7"] = "node7.example.org."
    dns.addrs["node7.example.org"] = ["2001:db8::7", "192.0.2.7"]
    allow = HostsAllow([r"^localhost$", r"^.*\.example\.org$"])
    assert await peer_allowed("192.0.2.7", allow, 1.0) == (True, "node7.example.org")
    assert dns.queries == ["PTR 192.0.2.7", "A node7.example.org"]


async def test_confirmed_name_for_ipv6_and_mapped_peers(dns: FakeDns) -> None:
    dns.ptr["2001:db8::7"] = "node7.example.org"
    dns.ptr["192.0.2.8"] = "node8.example.org"
    dns.addrs["node7.example.org"] = ["2001:DB8::7"]
    dns.addrs["node8.example.org"] = ["::ffff:192.0.2.8"]
    allow = HostsAllow([r"^node[0-9]+\.example\.org$"])
    assert await peer_allowed("2001:db8:0::7", allow, 1.0) == (True, "node7.example.org")
    assert await peer_allowed("::ffff:192.0.2.8", allow, 1.0) == (True, "node8.example.org")
    assert "PTR 192.0.2.8" in dns.queries  # looked up as the IPv4 address


async def test_unconfirmed_name_is_refused(dns: FakeDns) -> None:
    # The attacker controls the PTR of its own address but not example.org's A records.
    dns.ptr["203.0.113.66"] = "trusted.example.org"
    dns.addrs["trusted.example.org"] = ["192.0.2.10"]
    allow = HostsAllow([r"^trusted\.example\.org$"])
    assert await peer_allowed("203.0.113.66", allow, 1.0) == (False, None)


async def test_ptr_claiming_an_allowed_ip_is_refused(dns: FakeDns) -> None:
    dns.ptr["203.0.113.66"] = "192.0.2.1"
    dns.addrs["192.0.2.1"] = ["203.0.113.66"]
    allow = HostsAllow([r"^192\.0\.2\.1$"])
    assert await peer_allowed("203.0.113.66", allow, 1.0) == (False, None)
    assert dns.queries == ["PTR 203.0.113.66"]


async def test_name_not_matching_skips_forward_lookup(dns: FakeDns) -> None:
    dns.ptr["192.0.2.9"] = "other.example.net"
    allow = HostsAllow([r"^.*\.example\.org$"])
    assert await peer_allowed("192.0.2.9", allow, 1.0) == (False, None)
    assert dns.queries == ["PTR 192.0.2.9"]


async def test_dns_failures_refuse(dns: FakeDns) -> None:
    allow = HostsAllow([r"^.*\.example\.org$"])
    assert await peer_allowed("192.0.2.9", allow, 1.0) == (False, None)  # no PTR
    dns.ptr["192.0.2.9"] = "gone.example.org"
    assert await peer_allowed("192.0.2.9", allow, 1.0) == (False, None)  # no A record


async def test_dns_timeout_refuses_quickly(dns: FakeDns) -> None:
    dns.hang = True
    allow = HostsAllow([r"^.*\.example\.org$"])
    started = time.monotonic()
    assert await peer_allowed("192.0.2.9", allow, 0.05) == (False, None)
    assert time.monotonic() - started < 1.0


async def test_slow_dns_does_not_block_the_loop(dns: FakeDns) -> None:
    dns.hang = True
    allow = HostsAllow([r"^.*\.example\.org$"])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    await peer_allowed("192.0.2.9", allow, 0.1)
    task.cancel()
    assert ticks >= 5


async def test_real_resolver_on_loopback() -> None:
    # No monkeypatching: the real getnameinfo/getaddrinfo path, which must not raise.
    allowed, name = await peer_allowed("127.0.0.1", HostsAllow([r"^localhost(\.localdomain)?$"]), 2.0)
    if allowed:
        assert name is not None and name.lower().startswith("localhost")
    else:
        assert name is None
