"""A small CA and per-host certificates for TLS relocation in a lab or a test.

``relocd-certs DIR --ca`` writes ``DIR/ca.pem`` and ``DIR/ca.key``;
``relocd-certs DIR --host NAME [--ip ADDR]... [--dns NAME]...`` writes
``DIR/NAME.pem`` and ``DIR/NAME.key`` signed by that CA.  Host certificates
carry every name and address a peer may use to reach the host as
subjectAltNames (relocd checks the host given to ``migrate`` against them) and
are good for both server and client authentication, because a relocd host
presents the same certificate when it connects to a peer.

Keys are ECDSA P-256, written unencrypted with mode 0600.  A production site
should use its own PKI; this is for labs and tests.

``cryptography`` is only needed here (``pip install 'relocd[certs]'``) and is
imported on first use, so the daemon never depends on it.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from relocd.errors import RelocdError

__all__ = ["CertFiles", "main", "make_ca", "make_host_cert"]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_DAYS = 825


class CertToolError(RelocdError):
    """The certificate tool cannot do what was asked."""


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _crypto() -> dict[str, ModuleType]:
    """The cryptography modules, imported on first use."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509 import oid
    except ImportError:
        raise CertToolError(
            "relocd-certs needs the 'cryptography' package: pip install 'relocd[certs]'"
        ) from None
    return {"x509": x509, "hashes": hashes, "serialization": serialization, "ec": ec, "oid": oid}


def _write_private(path: Path, data: bytes, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CertToolError(f"{path} exists (use --force to replace it)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes, force: bool) -> None:
    if path.exists() and not force:
        raise CertToolError(f"{path} exists (use --force to replace it)")
    path.write_bytes(data)


def _new_key(c: dict[str, ModuleType]) -> Any:
    return c["ec"].generate_private_key(c["ec"].SECP256R1())


def _key_pem(c: dict[str, ModuleType], key: Any) -> bytes:
    s = c["serialization"]
    data: bytes = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    return data


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)  # small clock skew between lab hosts
    return start, start + datetime.timedelta(days=days)


def make_ca(directory: Path, *, name: str = "relocd lab CA", days: int = DEFAULT_DAYS, force: bool = False) -> CertFiles:
    """Write DIR/ca.pem and DIR/ca.key: a self-signed CA allowed to sign host certificates only."""
    c = _crypto()
    x509, oid = c["x509"], c["oid"]
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key(c)
    subject = x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, name)])
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, c["hashes"].SHA256())
    )
    files = CertFiles(directory / CA_CERT, directory / CA_KEY)
    _write_private(files.key, _key_pem(c, key), force)
    _write_public(files.cert, cert.public_bytes(c["serialization"].Encoding.PEM), force)
    return files


def _load_ca(c: dict[str, ModuleType], directory: Path) -> tuple[Any, Any]:
    files = CertFiles(directory / CA_CERT, directory / CA_KEY)
    try:
        cert = c["x509"].load_pem_x509_certificate(files.cert.read_bytes())
        key = c["serialization"].load_pem_private_key(files.key.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CertToolError(f"{exc.filename}: no such file (make the CA first: relocd-certs {directory} --ca)") from None
    except ValueError as exc:
        raise CertToolError(f"{directory}: cannot read the CA: {exc}") from None
    return cert, key


def make_host_cert(
    directory: Path,
    host: str,
    *,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> CertFiles:
    """Write DIR/HOST.pem and DIR/HOST.key, signed by the CA in DIR.

    subjectAltNames: HOST itself (as an IP SAN if it is an address, else a
    DNS SAN), every ``dns`` name and every ``ips`` address.
    """
    if not host or "/" in host or host.startswith("."):
        raise CertToolError(f"--host {host!r}: not a usable host name")
    c = _crypto()
    x509, oid = c["x509"], c["oid"]
    ca_cert, ca_key = _load_ca(c, directory)
    names: list[Any] = []
    try:
        addresses = [ipaddress.ip_address(a) for a in ips]
    except ValueError as exc:
        raise CertToolError(f"--ip: {exc}") from None
    try:
        addresses.insert(0, ipaddress.ip_address(host))
    except ValueError:
        names.append(x509.DNSName(host))
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(a) for a in dict.fromkeys(addresses)]
    key = _new_key(c)
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [oid.ExtendedKeyUsageOID.SERVER_AUTH, oid.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, c["hashes"].SHA256())
    )
    files = CertFiles(directory / f"{host}.pem", directory / f"{host}.key")
    _write_private(files.key, _key_pem(c, key), force)
    _write_public(files.cert, cert.public_bytes(c["serialization"].Encoding.PEM), force)
    return files


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relocd-certs",
        description="Make a small CA and per-host certificates for relocd's TLS relocation (labs, tests).",
    )
    p.add_argument("directory", type=Path, help="where ca.pem/ca.key and HOST.pem/HOST.key live")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ca", action="store_true", help="make the CA (ca.pem, ca.key)")
    what.add_argument("--host", metavar="NAME", help="make NAME.pem/NAME.key signed by the CA")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR", help="an IP subjectAltName (repeatable)")
    p.add_argument("--dns", action="append", default=[], metavar="NAME", help="a DNS subjectAltName (repeatable)")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    p.add_argument("--name", default="relocd lab CA", help="the CA's common name (with --ca)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.days < 1:
        print("relocd-certs: --days must be at least 1", file=sys.stderr)
        return 2
    try:
        if ns.ca:
            files = make_ca(ns.directory, name=ns.name, days=ns.days, force=ns.force)
        else:
            files = make_host_cert(
                ns.directory, ns.host, ips=tuple(ns.ip), dns=tuple(ns.dns), days=ns.days, force=ns.force
            )
    except RelocdError as exc:
        print(f"relocd-certs: {exc.message}", file=sys.stderr)
        return 1
    print(f"{files.cert}\n{files.key}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
