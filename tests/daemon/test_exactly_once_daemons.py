"""Issue 11 with real daemons: one claim per domain (hole 2), and a TLS migration in doubt
across a source restart (hole 3).  The engine-level tests of all eight holes are in
tests/unit/test_exactly_once.py (this file's name differs: pytest's default import mode
keys test modules by basename, and two test_exactly_once.py would not collect together)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from harness import DaemonProc, free_port

from relocd.errors import RelocdError

HOTSET = "hotset:size=4MiB,rate=20MB/s"


async def listing(d: DaemonProc) -> list[tuple[str, str]]:
    return [(x["name"], x["state"]) for x in await d.call("list")]


class SilentTarget:
    """A relocation port that takes each connection and its first bytes, and never answers.

    A migration to it sits at its first await after the claim for as long as
    the test wants: waiting for the target's HELLO (plain TCP), or inside the
    TLS handshake (``--ssl``: the connection is still being opened).
    ``hang_up`` ends it.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.port = free_port(address)
        self.connections = 0
        self.heard = asyncio.Event()
        self.hang_up = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if await reader.read(64):
            self.heard.set()
        await self.hang_up.wait()
        writer.close()

    async def __aenter__(self) -> SilentTarget:
        self._server = await asyncio.start_server(self._serve, self.address, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.hang_up.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def silent_target() -> AsyncIterator[SilentTarget]:
    async with SilentTarget("127.0.0.3") as t:
        yield t


async def outcome(call: Awaitable[object]) -> str:
    """'refused: MESSAGE', 'done', or 'let through' for a call still running after 10 s."""
    try:
        await asyncio.wait_for(call, 10)
    except RelocdError as exc:
        return f"refused: {exc.message}"
    except TimeoutError:
        return "let through (still running)"
    return "done"


@pytest.mark.parametrize("ssl", [False, True], ids=["awaiting-hello", "opening-tls"])
async def test_hole2_one_operation_per_domain(
    tmp_path: Path, daemons: list[DaemonProc], silent_target: SilentTarget, ssl: bool
) -> None:
    """While a migration holds the domain, every other operation on it is refused, naming the holder.

    With --ssl the migration is held while its connection is still being
    opened (the TLS handshake), before the fix a window with no mark at all.
    """
    a = DaemonProc(
        tmp_path, "hostA", "127.0.0.1", extra_config="(relocd-idle-timeout 120)\n(relocd-handshake-timeout 120)"
    )
    daemons.append(a)
    a.start()
    await a.call("create", name="web", memory=32, workload=HOTSET)
    t = silent_target
    migration = asyncio.create_task(a.call("migrate", name="web", host=t.address, port=t.port, live=True, ssl=ssl))
    await asyncio.wait_for(t.heard.wait(), 30)  # the migration holds the claim at its first await
    holder = f"web is busy: migration to {t.address}:{t.port} in progress"
    others: dict[str, Callable[[], Awaitable[object]]] = {
        "migrate": lambda: a.call("migrate", name="web", host=t.address, port=t.port, live=True, ssl=ssl),
        "save": lambda: a.call("save", name="web", file=str(tmp_path / "web.save")),
        "destroy": lambda: a.call("destroy", name="web"),
        "pause": lambda: a.call("pause", name="web"),
        "resume": lambda: a.call("resume", name="web"),
        "check": lambda: a.call("check", name="web"),
    }
    got = {op: await outcome(run()) for op, run in others.items()}
    assert got == {op: f"refused: {holder}" for op in others}, got
    assert t.connections == 1, "a second migration of the domain reached the target"
    assert await listing(a) == [("web", "migrating")]
    assert not migration.done()
    t.hang_up.set()
    result = await asyncio.wait_for(migration, 60)
    assert result["status"] == "failed", result
    # The claim went with the migration: the domain is the operator's again.
    assert await listing(a) == [("web", "running")]
    assert (await a.call("pause", name="web"))["state"] == "paused"
    assert (await a.call("resume", name="web"))["state"] == "running"
    assert not (tmp_path / "web.save").exists()


async def test_hole3_tls_migration_in_doubt_resolves_after_a_source_restart(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    """The source dies right after sending GO over TLS; restarted, it must ask the target over TLS.

    Before the fix recovery dialled plain TCP to the TLS port, forever: the
    target had resumed the domain, and the source kept web--migratedaway
    paused and its journal entry open.
    """
    pytest.importorskip("cryptography")
    from test_tls import common_free_port, tls_config

    from relocd.tools.certs import make_ca, make_host_cert

    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki)
    cert_a = make_host_cert(pki, "hostA", ips=("127.0.0.1",))
    cert_b = make_host_cert(pki, "hostB", ips=("127.0.0.2",))
    port = common_free_port("127.0.0.1", "127.0.0.2")
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1", extra_config=tls_config(port, cert_a, ca.cert),
                   env={"RELOCD_FAULT": "source:go:kill"})  # fmt: skip
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2", extra_config=tls_config(port, cert_b, ca.cert))
    daemons.extend([a, b])
    a.start()
    b.start()
    await a.call("create", name="web", memory=32, workload=HOTSET)
    with pytest.raises(RelocdError):  # the source is SIGKILLed with GO sent: no answer
        await a.call("migrate", name="web", host=b.address, ssl=True, live=True)
    assert a.proc is not None and a.proc.wait(30) != 0
    del a.env["RELOCD_FAULT"]
    a.start()
    for _ in range(300):  # recovery runs in the background: wait for it to settle (30 s at most)
        if await listing(a) == []:
            break
        await asyncio.sleep(0.1)
    assert await listing(a) == [], "the source still holds its paused copy: recovery never reached the target"
    assert await listing(b) == [("web", "running")]
    status = await a.call("status")
    assert status["in_doubt"] == 0, status
    check = await b.call("check", name="web")
    assert check["ok"], check["problem"]
