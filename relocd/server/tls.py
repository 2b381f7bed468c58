"""TLS relocation (port 8003): contexts, handshakes, and a ByteTransport over asyncio streams.

xend's SSL mode encrypted without checking anyone.  relocd verifies both ways:

* the connecting side always verifies the server's certificate, against
  ``relocd-relocation-ssl-ca-file`` when set, else the system store, and checks
  that it names the host given to ``migrate`` (an IP address must appear as an
  IP subjectAltName: Python's ssl module matches IP addresses against IP SANs
  only, never against a DNS SAN or the common name);
* with the CA file set, the listener requires a client certificate signed by
  that CA, so only hosts holding one of the operator's certificates can send
  domains here.  A host presents its own server key and certificate as client
  certificate (the cert tool marks them for both uses).

hosts-allow has already been applied by the listener when ``accept_tls`` runs:
a refused peer never gets a handshake.  The handshake runs under the
pre-authentication timeout.

TLS sockets cannot do ``sendmsg``/``recv_into`` through the loop, so this
module moves bytes through asyncio streams: ``StreamTransport`` implements the
engine's ``ByteTransport`` with reads in bounded chunks (nothing a peer sends
makes us buffer more than ``READ_CHUNK`` + a TLS record at a time).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import structlog

from relocd.config.settings import Settings
from relocd.engine.stream import PeerGone
from relocd.errors import AccessDenied, ConfigError, Reason
from relocd.server.transport import connect, tune_socket

__all__ = [
    "MIN_TLS_VERSION",
    "StreamTransport",
    "TlsRefused",
    "accept_tls",
    "client_context",
    "connect_tls",
    "describe_tls_error",
    "server_context",
]

log = structlog.get_logger("relocd.tls")

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
#: Largest single read from the stream; bounds what one read buffers.
READ_CHUNK = 1 << 20
#: StreamReader flow-control limit: reading pauses above twice this.
STREAM_LIMIT = 64 << 10

_KEY_OPTION = "xend-relocation-server-ssl-key-file"
_CERT_OPTION = "xend-relocation-server-ssl-cert-file"
_CA_OPTION = "relocd-relocation-ssl-ca-file"


class TlsRefused(PeerGone, AccessDenied):
    """The TLS layer refused the peer or the peer refused us (certificates, versions).

    A PeerGone, so engine code that handles a lost link handles this too.
    """

    reason = Reason.ACCESS


# -- contexts -------------------------------------------------------------------


def _no_password() -> str:
    # An encrypted key must fail to load, not prompt on the daemon's terminal.
    raise ConfigError("the key file is encrypted; relocd needs an unencrypted key")


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    except ConfigError as exc:
        raise ConfigError(f"{_KEY_OPTION}: {key}: {exc.message}") from None
    except FileNotFoundError as exc:
        raise ConfigError(f"{_CERT_OPTION}/{_KEY_OPTION}: {exc.filename or cert}: no such file") from None
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{_CERT_OPTION}/{_KEY_OPTION}: cannot load {cert} with {key}: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{_CERT_OPTION}/{_KEY_OPTION}: {exc.filename or cert}: {exc.strerror or exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except FileNotFoundError:
        raise ConfigError(f"{_CA_OPTION}: {ca}: no such file") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"{_CA_OPTION}: cannot load {ca}: {exc.reason or exc}") from None
    except OSError as exc:
        raise ConfigError(f"{_CA_OPTION}: {ca}: {exc.strerror or exc}") from None


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS listener's context; with a CA file it requires client certificates."""
    if settings.ssl_key_file is None or settings.ssl_cert_file is None:
        raise ConfigError(
            f"xend-relocation-ssl-server is on but {_KEY_OPTION} or {_CERT_OPTION} is not set"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS_VERSION
    _load_chain(ctx, settings.ssl_cert_file, settings.ssl_key_file)
    if settings.ssl_ca_file is not None:
        _load_ca(ctx, settings.ssl_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(settings: Settings) -> ssl.SSLContext:
    """The connecting side's context: verify the server, present our certificate if we have one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = MIN_TLS_VERSION
    if settings.ssl_ca_file is not None:
        _load_ca(ctx, settings.ssl_ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.ssl_key_file is not None and settings.ssl_cert_file is not None:
        _load_chain(ctx, settings.ssl_cert_file, settings.ssl_key_file)
    return ctx


# -- errors ------------------------------------------------------------------------

_REFUSED_US = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
    "HANDSHAKE_FAILURE",
)
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL", "PROTOCOL_VERSION",
            "NO_PROTOCOLS_AVAILABLE", "VERSION_TOO_LOW")  # fmt: skip


def describe_tls_error(exc: ssl.SSLError) -> str:
    """One line for the operator, starting with 'TLS: '."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: peer certificate not trusted: {exc.verify_message or exc.reason}"
    reason = str(exc.reason or "")
    upper = reason.upper()
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in upper:
        return "TLS: peer sent no client certificate"
    if any(word in upper for word in _REFUSED_US):
        return f"TLS: peer refused our certificate or settings: {reason.lower().replace('_', ' ')}"
    if any(word in upper for word in _NOT_TLS):
        return f"TLS: peer does not speak TLS 1.2 or later ({reason.lower().replace('_', ' ')})"
    text = reason.lower().replace("_", " ") if reason else str(exc).splitlines()[0]
    return f"TLS: {text}"


def _handshake_error(exc: BaseException, where: str, timeout: float) -> PeerGone:
    if isinstance(exc, ssl.SSLError):
        return TlsRefused(describe_tls_error(exc))
    if isinstance(exc, TimeoutError):
        return PeerGone(f"TLS: handshake with {where} timed out after {timeout:g} s")
    if isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc):
        return PeerGone(f"TLS: handshake with {where} timed out after {timeout:g} s")
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return PeerGone(f"TLS: handshake with {where} failed: {text}")


# -- the transport ------------------------------------------------------------------


class StreamTransport:
    """A TLS connection (asyncio streams) as a ByteTransport."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client: bool = False
    ) -> None:
        self.reader = reader
        self.client = client
        self.writer = writer
        self._closed = False
        self._received = 0

    @property
    def peer(self) -> str:
        name = self.writer.get_extra_info("peername")
        return str(name[0]) if name else "?"

    @property
    def tls_version(self) -> str | None:
        obj = self.writer.get_extra_info("ssl_object")
        return obj.version() if obj is not None else None

    def peer_certificate(self) -> dict[str, object] | None:
        """The verified peer certificate (None when the peer sent none)."""
        obj = self.writer.get_extra_info("ssl_object")
        cert = obj.getpeercert() if obj is not None else None
        return dict(cert) if cert else None

    def peer_identity(self) -> str | None:
        """The peer certificate's subject and alternative names, as one stable string.

        Binds an in-flight migration to the certificate that reserved it
        (issue 11): a QUERY or GO under another certificate is refused.
        """
        cert = self.peer_certificate()
        if cert is None:
            return None
        subject = cert.get("subject", ())
        parts = [
            f"{k}={v}"
            for rdn in subject  # type: ignore[attr-defined]
            for (k, v) in rdn
        ]
        alt = cert.get("subjectAltName", ())
        parts += [f"{k}:{v}" for (k, v) in alt]  # type: ignore[attr-defined]
        return ",".join(parts) or None

    async def read_exactly(self, n: int) -> bytes:
        try:
            data = await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise self._lost("peer closed the connection") from None
        except ssl.SSLError as exc:
            raise TlsRefused(describe_tls_error(exc)) from None
        except (ConnectionError, OSError) as exc:
            raise self._lost(f"connection lost: {exc.strerror or exc}") from None
        self._received += n
        return data

    async def read_into(self, view: memoryview) -> None:
        got = 0
        total = len(view)
        while got < total:
            chunk = await self.read_exactly(min(READ_CHUNK, total - got))
            view[got : got + len(chunk)] = chunk
            got += len(chunk)

    async def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        if self._closed or self.writer.is_closing():
            raise PeerGone("connection closed")
        # Both asyncio's and uvloop's TLS transports encrypt inside write()
        # once the handshake is done, so guest-memory views are not kept.
        views = [memoryview(b).cast("B") if isinstance(b, memoryview) else b for b in buffers]
        try:
            self.writer.writelines(views)
            await self.writer.drain()
        except ssl.SSLError as exc:
            raise TlsRefused(describe_tls_error(exc)) from None
        except (ConnectionError, OSError) as exc:
            raise self._lost(f"connection lost: {exc.strerror or exc}") from None

    def _lost(self, what: str) -> PeerGone:
        if self.client and self._received == 0:
            # With TLS 1.3 a server that rejects our certificate (or our lack of
            # one) does so after our side of the handshake is done, and its alert
            # rarely arrives before the close: say what is the likely cause.
            return TlsRefused(
                f"TLS: {what} right after the handshake "
                "(does the peer require a client certificate from a CA that did not sign ours?)"
            )
        return PeerGone(what)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        try:
            async with asyncio.timeout(2):
                await self.writer.wait_closed()
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError):
            self.writer.transport.abort()


# -- handshakes -------------------------------------------------------------------------


async def accept_tls(
    sock: socket.socket, ctx: ssl.SSLContext, *, timeout: float, peer: str
) -> StreamTransport:
    """Server side: the TLS handshake on an accepted, admitted socket."""
    loop = asyncio.get_running_loop()
    tune_socket(sock)
    reader = asyncio.StreamReader(limit=STREAM_LIMIT)
    protocol = asyncio.StreamReaderProtocol(reader)
    try:
        async with asyncio.timeout(timeout + 1):  # belt and braces over the TLS layer's own
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=ctx, ssl_handshake_timeout=timeout
            )
    except asyncio.CancelledError:
        raise
    except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError are OSErrors
        raise _handshake_error(exc, peer, timeout) from None
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return StreamTransport(reader, writer)


async def connect_tls(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> StreamTransport:
    """Client side: connect (every address of ``host`` in turn), then the handshake.

    The certificate must name ``host`` exactly as the operator gave it: a DNS
    name as a DNS subjectAltName, an IP address as an IP subjectAltName.
    """
    plain = await connect(host, port, timeout)
    sock = plain.sock
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout + 1):
            reader, writer = await asyncio.open_connection(
                sock=sock,
                ssl=ctx,
                server_hostname=host,
                ssl_handshake_timeout=timeout,
                limit=STREAM_LIMIT,
            )
    except asyncio.CancelledError:
        sock.close()
        raise
    except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError are OSErrors
        sock.close()
        raise _handshake_error(exc, where, timeout) from None
    return StreamTransport(reader, writer, client=True)
