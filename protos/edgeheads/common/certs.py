"""The cluster's certificates for mutual TLS: a private CA and one leaf per node, written with
safe permissions, and the PEM parsing and checks that loading them (edgeheads.common.tls) shares.

Every key is EC P-256 (gRPC's BoringSSL and Python's OpenSSL both accept it). The CA signs leaves
only (``path_length=0``). Every daemon both serves and dials, so each leaf carries serverAuth and
clientAuth; its SubjectAlternativeName lists the node name and the hosts it is dialed by.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
import re
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# a new certificate is valid from a little before now: a node whose clock lags may use it at once
CLOCK_SKEW = dt.timedelta(minutes=5)
KEY_MODE = 0o600
CERT_MODE = 0o644
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

SanEntry = x509.DNSName | x509.IPAddress


class CertError(ValueError):
    """A certificate or key that cannot be used; the message names the file (or the input)."""


# ----------------------------------------------------------------------------- creation

def make_ca(common_name: str, days: int) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a new self-signed CA valid for ``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    cert = (_builder(name, name, key.public_key(), not_before, not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .sign(key, hashes.SHA256()))
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def make_node_cert(ca_key_pem: bytes, ca_cert_pem: bytes, name: str, hosts: list[str],
                   days: int) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a new leaf for node ``name``, signed by the CA.

    ``hosts`` are the addresses the node is dialed by: an IP address goes into the
    SubjectAlternativeName as an IPAddress, anything else as a DNSName; ``name`` is always a
    DNSName. The leaf expires with the CA at the latest. Raises CertError for a bad name or host,
    a CA key that does not match the CA certificate, or a CA certificate that is no CA.
    """
    ca_key = parse_private_key(ca_key_pem, "the CA key")
    ca_cert = parse_certificates(ca_cert_pem, "the CA certificate")[0]
    check_key_matches(ca_cert, ca_key, "the CA key")
    if not is_ca(ca_cert):
        raise CertError("the CA certificate is not a CA (BasicConstraints ca=False or missing)")
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    cert = (_builder(subject, ca_cert.subject, key.public_key(), not_before, not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(san_entries(name, hosts)), critical=False)
            .add_extension(_authority_key_id(ca_cert), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def san_entries(name: str, hosts: list[str]) -> list[SanEntry]:
    """The SubjectAlternativeName of node ``name`` dialed by ``hosts``, without duplicates."""
    entries: list[SanEntry] = [x509.DNSName(check_dns_name(name, "node name"))]
    for host in hosts:
        try:
            entry: SanEntry = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(check_dns_name(host, "host"))
        if entry not in entries:
            entries.append(entry)
    return entries


def check_dns_name(text: str, what: str) -> str:
    """``text`` when it is a DNS name (letters, digits, hyphens; dot-separated labels), else CertError."""
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise CertError(f"{what} {text!r} is neither an IP address nor a DNS name")
    return text


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise CertError(f"days must be at least 1, got {days}")
    now = dt.datetime.now(dt.timezone.utc)
    return now - CLOCK_SKEW, now + dt.timedelta(days=days)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, not_before: dt.datetime,
             not_after: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# ----------------------------------------------------------------------------- writing

def write_bundle(directory: str | Path, stem: str, key_pem: bytes, cert_pem: bytes, *,
                 ca_cert_pem: bytes | None = None, force: bool = False) -> list[Path]:
    """Write ``STEM.key`` (0600) and ``STEM.crt`` (0644), and ``ca.crt`` (0644) when given, into
    ``directory`` (created 0700 if missing); the paths written, in that order.

    Nothing is written when a file exists and ``force`` is false (FileExistsError whose
    ``filename`` is that file), except an existing ``ca.crt`` with exactly these bytes, which is
    left as it is. Each file goes to a temporary file first and is renamed into place, so it
    never exists half-written or with looser permissions.
    """
    directory = Path(directory)
    planned = [(directory / f"{stem}.key", key_pem, KEY_MODE), (directory / f"{stem}.crt", cert_pem, CERT_MODE)]
    if ca_cert_pem is not None:
        if stem == "ca":
            raise CertError("a node named 'ca' would overwrite the copy of the CA certificate")
        planned.append((directory / "ca.crt", ca_cert_pem, CERT_MODE))
    planned = [(path, data, mode) for path, data, mode in planned if not _same_ca_copy(path, data)]
    for path, _, _ in planned:
        if path.exists() and not force:
            raise FileExistsError(errno.EEXIST, "already exists; not overwritten without force", str(path))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, data, mode in planned:
        _write_atomically(path, data, mode)
    return [path for path, _, _ in planned]


def _same_ca_copy(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a copy of the CA certificate that already holds exactly ``data``."""
    return path.name == "ca.crt" and path.is_file() and path.read_bytes() == data


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- parsing and checks

def parse_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    """Every certificate in PEM ``data`` (at least one), else CertError naming ``where``."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertError(f"{where}: not a PEM certificate") from None
    return certs


def parse_private_key(data: bytes, where: str):
    """The unencrypted PEM private key in ``data``, else CertError naming ``where``."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertError(f"{where}: the private key is encrypted; give an unencrypted one") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{where}: not a PEM private key") from None


def check_key_matches(cert: x509.Certificate, key, where: str) -> None:
    """CertError naming ``where`` unless ``key`` is the private half of ``cert``'s public key."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CertError(f"{where}: the private key does not belong to the certificate")


def check_issued_by(cert: x509.Certificate, cas: list[x509.Certificate], where: str) -> None:
    """CertError naming ``where`` unless one of ``cas`` signed ``cert``."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise CertError(f"{where}: not signed by the CA (issuer {cert.issuer.rfc4514_string()!r})")


def check_valid_now(cert: x509.Certificate, where: str, now: dt.datetime | None = None) -> None:
    """CertError naming ``where`` when ``cert`` has expired or is not valid yet."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise CertError(f"{where}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < cert.not_valid_before_utc:
        raise CertError(f"{where}: the certificate is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` has BasicConstraints ca=True."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
