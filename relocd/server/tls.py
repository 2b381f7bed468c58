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

The bytes themselves move through ``tls_socket.TlsSocketTransport``: an
``ssl.SSLSocket`` whose bulk transfers run in worker threads, so pages are
encrypted off the event loop, one core per channel.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import structlog

from relocd.config.settings import Settings
from relocd.engine.stream import PeerGone
from relocd.errors import AccessDenied, ConfigError, Reason
from relocd.server.tls_socket import TlsSocketTransport, handshake
from relocd.server.transport import connect

__all__ = [
    "MIN_TLS_VERSION",
    "TlsSocketTransport",
    "TlsRefused",
    "accept_tls",
    "client_context",
    "connect_tls",
    "describe_tls_error",
    "server_context",
]

log = structlog.get_logger("relocd.tls")

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2

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


# -- handshakes -------------------------------------------------------------------------


async def accept_tls(
    sock: socket.socket, ctx: ssl.SSLContext, *, timeout: float, peer: str
) -> TlsSocketTransport:
    """Server side: the TLS handshake on an accepted, admitted socket."""
    try:
        sslsock = await handshake(sock, ctx, server_hostname=None, timeout=timeout)
    except asyncio.CancelledError:
        raise
    except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError are OSErrors
        raise _handshake_error(exc, peer, timeout) from None
    return TlsSocketTransport(sslsock, client=False, describe=describe_tls_error, refused=TlsRefused)


async def connect_tls(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> TlsSocketTransport:
    """Client side: connect (every address of ``host`` in turn), then the handshake.

    The certificate must name ``host`` exactly as the operator gave it: a DNS
    name as a DNS subjectAltName, an IP address as an IP subjectAltName.
    """
    plain = await connect(host, port, timeout)
    sock = plain.sock
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sslsock = await handshake(sock, ctx, server_hostname=host, timeout=timeout)
    except asyncio.CancelledError:
        sock.close()
        raise
    except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError are OSErrors
        sock.close()
        raise _handshake_error(exc, where, timeout) from None
    return TlsSocketTransport(sslsock, client=True, describe=describe_tls_error, refused=TlsRefused)
