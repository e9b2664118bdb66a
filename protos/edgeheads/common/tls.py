"""Mutual TLS credentials of a node: its CA certificate, its own certificate and key (made by
``edgeheads certs``, edgeheads.common.certs), checked when loaded, as gRPC credentials for the
daemons and as ``ssl`` contexts for the workers' raw TCP relay port.

Both sides authenticate: a server asks every client for a certificate signed by the CA, and a
client checks that the server's certificate is signed by the CA and names the host it dialed.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgeheads.common.certs import (CertError, check_issued_by, check_key_matches, check_valid_now, is_ca,
                                    parse_certificates, parse_private_key)

__all__ = ["CertError", "TlsFiles", "TlsMaterial", "channel_credentials", "load_tls_files", "server_credentials",
           "ssl_contexts"]


@dataclass(frozen=True)
class TlsFiles:
    """Where a node's TLS files are: the CA certificate, its certificate and its private key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_directory(cls, directory: str | Path, name: str) -> TlsFiles:
        """The layout ``edgeheads certs node NAME`` writes: ``ca.crt``, ``NAME.crt``, ``NAME.key``."""
        directory = Path(directory)
        return cls(directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key")


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of a node's TLS files, checked to belong together."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def load_tls_files(files: TlsFiles) -> TlsMaterial:
    """Read and check ``files``: each exists, is readable and is PEM; the CA file holds CA
    certificates; the key belongs to the certificate; a CA signed the certificate; and every
    certificate is valid now. Raises CertError (a ValueError) naming the file otherwise."""
    material = TlsMaterial(_read(files.ca), _read(files.cert), _read(files.key))
    cas = parse_certificates(material.ca_pem, str(files.ca))
    for ca in cas:
        if not is_ca(ca):
            raise CertError(f"{files.ca}: {ca.subject.rfc4514_string()!r} is not a CA certificate")
        check_valid_now(ca, str(files.ca))
    cert = parse_certificates(material.cert_pem, str(files.cert))[0]
    key = parse_private_key(material.key_pem, str(files.key))
    check_key_matches(cert, key, f"{files.key} and {files.cert}")
    check_issued_by(cert, cas, f"{files.cert} (CA {files.ca})")
    check_valid_now(cert, str(files.cert))
    return material


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CertError(f"{path}: is a directory, not a file") from None
    except OSError as err:
        raise CertError(f"{path}: cannot be read ({err.strerror or err})") from None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """A gRPC server's credentials: present the node's certificate and require a client
    certificate signed by the CA."""
    m = load_tls_files(files)
    return grpc.ssl_server_credentials([(m.key_pem, m.cert_pem)], root_certificates=m.ca_pem,
                                       require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """A gRPC channel's credentials: trust servers the CA signed and present the node's certificate.

    gRPC checks the server's certificate against the dialed host (its SubjectAlternativeName must
    hold that IP address or DNS name)."""
    m = load_tls_files(files)
    return grpc.ssl_channel_credentials(root_certificates=m.ca_pem, private_key=m.key_pem,
                                        certificate_chain=m.cert_pem)


def ssl_contexts(files: TlsFiles) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for the relay's raw TCP connections (asyncio streams).

    The server requires a client certificate signed by the CA (CERT_REQUIRED). The client checks
    the server against the CA and keeps ``check_hostname=True``: nodes are dialed by address, so
    the server's certificate must list the dialed host (the IP address, or the name when dialed
    by name) among its ``--host`` entries, and the caller passes that host as ``server_hostname``
    (asyncio does so by itself for ``open_connection(host, port, ssl=client)``). Both present the
    node's certificate and accept TLS 1.2 at least.
    """
    load_tls_files(files)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname=True
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cafile=files.ca)
        context.load_cert_chain(files.cert, files.key)
    server.verify_mode = ssl.CERT_REQUIRED
    return server, client
