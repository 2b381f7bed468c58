"""TLS relocation: real daemons on 127.0.0.x with certificates from relocd.tools.certs.

Daemon-level tests cover the listener (hosts-allow before the handshake, the
handshake timeout, client certificates) and `migrate --ssl`; the client's
certificate checks (untrusted CA, wrong name, expired) run in-process against
a daemon or a small TLS echo server, which is faster and tests the same code.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProc, free_port

from relocd.config.settings import Settings
from relocd.engine.stream import PeerGone
from relocd.errors import ConfigError
from relocd.protocol.codec import PREAMBLE, encode
from relocd.protocol.records import Hello, Role
from relocd.server.tls import (
    MIN_TLS_VERSION,
    TlsRefused,
    accept_tls,
    client_context,
    connect_tls,
    server_context,
)

pytest.importorskip("cryptography")
from relocd.tools.certs import CertFiles, make_ca, make_host_cert

HOTSET = "hotset:size=8MiB,rate=20MB/s"


@dataclass
class Lab:
    """Certificates: a good CA with hosts A, B, C and a misnamed B; a rogue CA with its own B."""

    ca: CertFiles
    hosts: dict[str, CertFiles]
    rogue_ca: CertFiles
    rogue_b: CertFiles


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    good = tmp_path_factory.mktemp("pki")
    rogue = tmp_path_factory.mktemp("rogue")
    ca = make_ca(good)
    hosts = {
        "hostA": make_host_cert(good, "hostA", ips=("127.0.0.1",)),
        "hostB": make_host_cert(good, "hostB", ips=("127.0.0.2",)),
        "hostC": make_host_cert(good, "hostC", ips=("127.0.0.3",)),
        "misnamed": make_host_cert(good, "misnamed", ips=("127.0.0.9",)),
    }
    rogue_ca = make_ca(rogue, name="someone else's CA")
    return Lab(ca, hosts, rogue_ca, make_host_cert(rogue, "hostB", ips=("127.0.0.2",)))


def common_free_port(*addresses: str) -> int:
    """A port free on every address (both daemons listen on the same TLS port, as xend expects)."""
    for _ in range(50):
        port = free_port(addresses[0])
        try:
            for addr in addresses[1:]:
                with socket.socket() as s:
                    s.bind((addr, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


def tls_config(
    port: int, files: CertFiles | None, ca: Path | None, *, server: bool = True, extra: str = ""
) -> str:
    lines = [f"(xend-relocation-ssl-port {port})"]
    if server:
        lines.append("(xend-relocation-ssl-server yes)")
    if files is not None:
        lines += [
            f"(xend-relocation-server-ssl-key-file '{files.key}')",
            f"(xend-relocation-server-ssl-cert-file '{files.cert}')",
        ]
    if ca is not None:
        lines.append(f"(relocd-relocation-ssl-ca-file '{ca}')")
    return "\n".join(lines) + "\n" + extra


def short_timeouts(d: DaemonProc, handshake: float = 1, idle: float = 10) -> DaemonProc:
    """The harness writes its own timeouts first (the first occurrence wins): replace them."""
    text = d.config.read_text()
    text = text.replace("(relocd-handshake-timeout 5)", f"(relocd-handshake-timeout {handshake:g})")
    text = text.replace("(relocd-idle-timeout 10)", f"(relocd-idle-timeout {idle:g})")
    d.config.write_text(text)
    return d


def log_mark(d: DaemonProc) -> int:
    """Where the daemon's log ends now: what a test's own action logs comes after it."""
    return d.log.stat().st_size if d.log.exists() else 0


def log_events_since(d: DaemonProc, mark: int) -> list[dict[str, Any]]:
    """The JSON log lines the daemon wrote after ``mark`` (the tls_pair log is shared by the module)."""
    with d.log.open("rb") as f:
        f.seek(mark)
        text = f.read().decode(errors="replace")
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a traceback line, or the tail of a line cut by the mark
        if isinstance(event, dict):
            events.append(event)
    return events


def tls_refusals(d: DaemonProc, mark: int) -> list[str]:
    """The errors of the TLS handshakes the daemon refused after ``mark``."""
    return [
        str(e.get("error", ""))
        for e in log_events_since(d, mark)
        if e.get("event") == "connection refused: TLS handshake failed"
    ]


async def listing(d: DaemonProc) -> list[tuple[str, str]]:
    return [(x["name"], x["state"]) for x in await d.call("list")]


@pytest.fixture(scope="module")
def tls_pair(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, DaemonProc, int]]:
    """A (127.0.0.1) and B (127.0.0.2): TLS listeners on the same port, client certificates required.

    B also has ``xend-relocation-ssl yes``, so its migrations use TLS without --ssl.
    """
    root = tmp_path_factory.mktemp("tls")
    port = common_free_port("127.0.0.1", "127.0.0.2")
    a = DaemonProc(root, "hostA", "127.0.0.1", extra_config=tls_config(port, lab.hosts["hostA"], lab.ca.cert))
    b = DaemonProc(
        root, "hostB", "127.0.0.2",
        extra_config=tls_config(port, lab.hosts["hostB"], lab.ca.cert, extra="(xend-relocation-ssl yes)\n"),
    )  # fmt: skip
    short_timeouts(b)
    try:
        a.start()
        b.start()
        yield a, b, port
    finally:
        a.cleanup()
        b.cleanup()


async def test_live_migration_over_tls_both_ways(tls_pair: tuple[DaemonProc, DaemonProc, int]) -> None:
    a, b, port = tls_pair
    status = await a.call("status")
    assert f"127.0.0.1:{port}" in status["listen"]
    await a.call("create", name="tlsweb", memory=32, workload=HOTSET)
    mark = log_mark(b)
    result = await a.call("migrate", name="tlsweb", host=b.address, ssl=True, live=True, verify=True)
    assert result["status"] == "completed", result
    assert result["verified"] is True
    assert await listing(b) == [("tlsweb", "running")]
    events = log_events_since(b, mark)
    assert any(e.get("listener") == "relocation-ssl" for e in events)
    # the default four page channels: each extra one made its own TLS handshake and joined
    assert result["channels"] == 4
    assert sum(e.get("event") == "connection accepted" and e.get("listener") == "relocation-ssl" for e in events) == 4
    assert sum(e.get("event") == "channel joined" for e in events) == 3
    # Back again: B has xend-relocation-ssl on, so no --ssl and no port are needed.
    result = await b.call("migrate", name="tlsweb", host=a.address, live=True, channels=4)
    assert result["status"] == "completed", result
    assert result["channels"] == 4
    assert await listing(a) == [("tlsweb", "running")]
    check = await a.call("check", name="tlsweb")
    assert check["ok"], check["problem"]
    await a.call("destroy", name="tlsweb")


async def test_plain_port_still_works_next_to_tls(tls_pair: tuple[DaemonProc, DaemonProc, int]) -> None:
    a, b, _ = tls_pair
    await a.call("create", name="plainweb", memory=16)
    result = await a.call("migrate", name="plainweb", host=b.address, port=b.port, ssl=False)
    assert result["status"] == "completed", result
    await b.call("destroy", name="plainweb")


def _raw_tls_client(port: int, ctx: ssl.SSLContext, host: str = "127.0.0.2") -> bytes:
    """Handshake, send a preamble and HELLO, return what comes back (b'' when the server hangs up)."""
    hello = Hello.current(Role.SOURCE, migration_id=uuid.uuid4().bytes)
    with socket.create_connection((host, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            try:
                # TLS 1.3: a server refusing our certificate does so after our side of
                # the handshake, so its hang-up may meet our write as well as our read
                s.sendall(PREAMBLE + encode(hello))
                return s.recv(64)
            except (ssl.SSLError, ConnectionError):
                return b""


async def test_server_refuses_clients_without_a_good_certificate(
    lab: Lab, tls_pair: tuple[DaemonProc, DaemonProc, int]
) -> None:
    _, b, port = tls_pair
    loop = asyncio.get_running_loop()
    mark = log_mark(b)
    # No client certificate at all.
    no_cert = client_context(Settings(ssl_ca_file=lab.ca.cert))
    got = await loop.run_in_executor(None, _raw_tls_client, port, no_cert)
    assert got == b""
    # A certificate from another CA.
    rogue = client_context(
        Settings(ssl_ca_file=lab.ca.cert, ssl_key_file=lab.rogue_b.key, ssl_cert_file=lab.rogue_b.cert)
    )
    try:
        got = await loop.run_in_executor(None, _raw_tls_client, port, rogue)
    except ssl.SSLError:
        got = b""  # TLS 1.2 reports it during the handshake
    assert got == b""
    await asyncio.sleep(0.3)
    refusals = tls_refusals(b, mark)
    assert "TLS: peer sent no client certificate" in refusals, refusals
    assert any(r.startswith("TLS: peer certificate not trusted") for r in refusals), refusals
    # A good certificate gets the daemon's preamble back.
    good = client_context(
        Settings(ssl_ca_file=lab.ca.cert, ssl_key_file=lab.hosts["hostC"].key, ssl_cert_file=lab.hosts["hostC"].cert)
    )
    assert (await loop.run_in_executor(None, _raw_tls_client, port, good)).startswith(PREAMBLE)


async def test_migrate_without_client_certificate_fails_cleanly(
    lab: Lab, tls_pair: tuple[DaemonProc, DaemonProc, int], tmp_path: Path
) -> None:
    _, b, port = tls_pair
    c = DaemonProc(tmp_path, "hostC", "127.0.0.3", extra_config=tls_config(port, None, lab.ca.cert, server=False))
    try:
        c.start()
        await c.call("create", name="nocert", memory=16)
        result = await c.call("migrate", name="nocert", host=b.address, ssl=True, live=True)
        assert result["status"] == "failed", result
        assert result["error"].startswith("TLS: "), result["error"]
        assert "\n" not in result["error"]
        assert await listing(c) == [("nocert", "running")]
        assert "nocert" not in dict(await listing(b))
    finally:
        c.cleanup()


async def test_client_checks_the_server_certificate(
    lab: Lab, tls_pair: tuple[DaemonProc, DaemonProc, int]
) -> None:
    _, b, port = tls_pair
    # Our client trusts another CA only: B's certificate is not trusted.
    ctx = client_context(Settings(ssl_ca_file=lab.rogue_ca.cert))
    with pytest.raises(TlsRefused, match=r"^TLS: peer certificate not trusted: (unable to get local issuer|self-signed certificate in certificate chain)"):
        await connect_tls(b.address, port, ctx, timeout=5)
    # No CA file: the system store, which does not know the lab CA either.
    with pytest.raises(TlsRefused, match=r"^TLS: peer certificate not trusted"):
        await connect_tls(b.address, port, client_context(Settings()), timeout=5)
    # The right CA and the right name (an IP SAN): accepted.
    ok = client_context(
        Settings(ssl_ca_file=lab.ca.cert, ssl_key_file=lab.hosts["hostC"].key, ssl_cert_file=lab.hosts["hostC"].cert)
    )
    transport = await connect_tls(b.address, port, ok, timeout=5)
    assert transport.tls_version in ("TLSv1.2", "TLSv1.3")
    assert transport.peer_certificate() is not None
    await transport.close()


async def test_hosts_allow_is_applied_before_the_handshake(lab: Lab, tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    b = DaemonProc(
        tmp_path, "hostB", "127.0.0.2",
        extra_config=tls_config(port, lab.hosts["hostB"], None, extra="(xend-relocation-hosts-allow '^10\\\\.9\\\\.9\\\\.9$')\n"),
    )  # fmt: skip
    try:
        b.start()
        ctx = client_context(Settings(ssl_ca_file=lab.ca.cert))
        with pytest.raises(PeerGone, match="TLS: "):
            await connect_tls(b.address, port, ctx, timeout=5)
        await asyncio.sleep(0.2)
        log = b.log_text()
        assert "connection refused by hosts-allow" in log and '"listener": "relocation-ssl"' in log
        assert "TLS handshake failed" not in log  # no handshake was even tried
    finally:
        b.cleanup()


async def test_stalled_and_plaintext_peers_on_the_tls_port(
    lab: Lab, tls_pair: tuple[DaemonProc, DaemonProc, int]
) -> None:
    a, b, port = tls_pair
    loop = asyncio.get_running_loop()

    def stall() -> float:
        start = time.monotonic()
        with socket.create_connection((b.address, port), timeout=10) as s:
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
        return time.monotonic() - start

    def plaintext() -> bytes:
        with socket.create_connection((b.address, port), timeout=10) as s:
            s.sendall(PREAMBLE + bytes(64))
            try:
                return s.recv(4096)
            except OSError:
                return b""

    mark = log_mark(b)
    waited, answer = await asyncio.gather(
        loop.run_in_executor(None, stall), loop.run_in_executor(None, plaintext)
    )
    assert 0.5 <= waited < 5, waited  # relocd-handshake-timeout is 1 s in this config
    assert not answer.startswith(PREAMBLE)  # a TLS alert at most, never the relocd protocol
    await asyncio.sleep(0.2)
    # Only what these two peers caused: the module's earlier tests logged 'TLS: ' lines too.
    refusals = tls_refusals(b, mark)
    assert any(r.endswith("timed out after 1 s") for r in refusals), refusals
    assert any(r.startswith("TLS: peer does not speak TLS 1.2 or later") for r in refusals), refusals
    # Everyone else is still served.
    await a.call("create", name="after", memory=16)
    result = await a.call("migrate", name="after", host=b.address, ssl=True)
    assert result["status"] == "completed", result
    await b.call("destroy", name="after")


# -- in-process: a TLS server built from the same contexts ------------------------------------


async def _tls_echo(ctx: ssl.SSLContext) -> tuple[asyncio.Task[None], int]:
    """Accepts TLS connections; echoes 4 bytes and sends 100000 more, then closes."""
    server_sock = socket.socket()
    server_sock.bind(("127.0.0.1", 0))
    server_sock.listen()
    server_sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def accept_loop() -> None:
        while True:
            conn, addr = await loop.sock_accept(server_sock)
            try:
                t = await accept_tls(conn, ctx, timeout=2, peer=addr[0])
            except PeerGone:
                conn.close()
                continue
            data = await t.read_exactly(4)
            await t.write([data, memoryview(b"!" * 100000)])
            await t.close()

    task = loop.create_task(accept_loop())
    task.add_done_callback(lambda _: server_sock.close())
    return task, int(server_sock.getsockname()[1])


async def test_wrong_name_and_round_trip_in_process(lab: Lab) -> None:
    for name, expect in (("misnamed", "IP address mismatch"), ("hostA", None)):
        files = lab.hosts[name]
        sctx = server_context(Settings(ssl_key_file=files.key, ssl_cert_file=files.cert))
        task, port = await _tls_echo(sctx)
        try:
            cctx = client_context(Settings(ssl_ca_file=lab.ca.cert))
            if expect:
                with pytest.raises(TlsRefused, match=f"^TLS: peer certificate not trusted: {expect}"):
                    await connect_tls("127.0.0.1", port, cctx, timeout=5)
                continue
            t = await connect_tls("127.0.0.1", port, cctx, timeout=5)
            await t.write([b"ping"])
            assert await t.read_exactly(4) == b"ping"
            buf = bytearray(100000)
            await t.read_into(memoryview(buf))
            assert buf == b"!" * 100000
            with pytest.raises(PeerGone):
                await t.read_exactly(1)
            await t.close()
        finally:
            task.cancel()


def test_contexts_refuse_old_tls_and_bad_files(lab: Lab, tmp_path: Path) -> None:
    files = lab.hosts["hostA"]
    sctx = server_context(Settings(ssl_key_file=files.key, ssl_cert_file=files.cert, ssl_ca_file=lab.ca.cert))
    assert sctx.minimum_version == MIN_TLS_VERSION == ssl.TLSVersion.TLSv1_2
    assert sctx.verify_mode == ssl.CERT_REQUIRED
    cctx = client_context(Settings(ssl_ca_file=lab.ca.cert))
    assert cctx.check_hostname and cctx.verify_mode == ssl.CERT_REQUIRED
    assert cctx.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match="is not set"):
        server_context(Settings(ssl_key_file=files.key))
    with pytest.raises(ConfigError, match="no such file"):
        client_context(Settings(ssl_ca_file=tmp_path / "nope.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="relocd-relocation-ssl-ca-file: cannot load"):
        client_context(Settings(ssl_ca_file=bad))
    with pytest.raises(ConfigError, match="cannot load"):
        server_context(Settings(ssl_key_file=lab.hosts["hostB"].key, ssl_cert_file=files.cert))
    # An encrypted key fails to load instead of prompting on the daemon's terminal.
    from cryptography.hazmat.primitives import serialization as ser

    key = ser.load_pem_private_key(files.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"pw"))
    )
    with pytest.raises(ConfigError, match="the key file is encrypted"):
        server_context(Settings(ssl_key_file=encrypted, ssl_cert_file=files.cert))


def test_cert_tool_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relocd.tools.certs import main

    assert main([str(tmp_path), "--host", "h"]) == 1  # no CA yet
    assert "make the CA first" in capsys.readouterr().err
    assert main([str(tmp_path), "--ca"]) == 0
    assert main([str(tmp_path), "--host", "h", "--ip", "192.0.2.1", "--dns", "h.example"]) == 0
    assert main([str(tmp_path), "--host", "h"]) == 1  # exists
    assert main([str(tmp_path), "--host", "h", "--ip", "not-an-ip", "--force"]) == 1
    assert (tmp_path / "h.key").stat().st_mode & 0o777 == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "h.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["h", "h.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.1"]
