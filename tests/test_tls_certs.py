"""Mutual TLS for the cluster (edgeheads.common.certs, .tls, ``edgeheads certs``): real keys and
certificates, a real gRPC server and a real asyncio TLS server on 127.0.0.1, no mocks.

Hostnames: the server's certificate is issued for the hosts "127.0.0.1" and "localhost" and the
clients dial "127.0.0.1:PORT" directly, so the check relies on the IP address in the
SubjectAlternativeName, as it will when nodes dial each other by address (no target name
override). A certificate without that address is refused, so the check is on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import stat

import grpc
import pytest
from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from edgeheads.common.certs import (CertError, check_valid_now, make_ca, make_node_cert, san_entries,
                                    write_bundle)
from edgeheads.common.tls import TlsFiles, channel_credentials, load_tls_files, server_credentials, ssl_contexts
from edgeheads.headnode.cli import main

TIMEOUT = 5.0


def issue(directory, ca, name, hosts=()) -> TlsFiles:
    """A node's files (ca.crt, NAME.crt, NAME.key) in ``directory``, signed by ``ca`` (key, cert)."""
    key_pem, cert_pem = make_node_cert(ca[0], ca[1], name, list(hosts), days=30)
    write_bundle(directory, name, key_pem, cert_pem, ca_cert_pem=ca[1])
    return TlsFiles.in_directory(directory, name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two CAs and node files: ``server``/``client`` of the cluster CA, ``stranger`` of another."""
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca("test cluster CA", 30), make_ca("other CA", 30)
    return {
        "ca": ca,
        "server": issue(root / "server", ca, "server", ["127.0.0.1", "localhost"]),
        "client": issue(root / "client", ca, "client"),
        "elsewhere": issue(root / "elsewhere", ca, "elsewhere", ["10.9.9.9"]),
        "stranger": issue(root / "stranger", other_ca, "stranger", ["127.0.0.1"]),
    }


# ----------------------------------------------------------------------------- certificates

def test_node_cert_is_a_leaf_the_ca_signed_for_its_hosts():
    ca_key, ca_pem = make_ca("test CA", 30)
    _, cert_pem = make_node_cert(ca_key, ca_pem, "worker-1", ["10.0.0.5", "w1.lan", "::1", "worker-1"], 30)
    ca, cert = x509.load_pem_x509_certificate(ca_pem), x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["worker-1", "w1.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_constraints.ca is True and ca_constraints.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    # a full RFC 5280 path validation (cryptography's verifier) for a host in the SAN
    store = verification.Store([ca])
    verification.PolicyBuilder().store(store).build_server_verifier(x509.IPAddress(
        ipaddress.ip_address("10.0.0.5"))).verify(cert, [])
    verification.PolicyBuilder().store(store).build_client_verifier().verify(cert, [])


def test_node_cert_expires_with_the_ca_at_the_latest():
    ca_key, ca_pem = make_ca("short-lived CA", 2)
    _, cert_pem = make_node_cert(ca_key, ca_pem, "n", [], 365)
    ca, cert = x509.load_pem_x509_certificate(ca_pem), x509.load_pem_x509_certificate(cert_pem)
    assert cert.not_valid_after_utc == ca.not_valid_after_utc


@pytest.mark.parametrize("name,hosts", [("bad name", []), ("n", ["has space"]), ("n", ["-dash.lan"]),
                                        ("n", ["a..b"]), ("n/../x", [])])
def test_a_bad_name_or_host_is_refused(name, hosts):
    with pytest.raises(CertError, match="neither an IP address nor a DNS name"):
        san_entries(name, hosts)


def test_make_node_cert_needs_the_ca_key_of_a_ca():
    ca_key, ca_pem = make_ca("CA", 30)
    other_key, _ = make_ca("other", 30)
    with pytest.raises(CertError, match="does not belong"):
        make_node_cert(other_key, ca_pem, "n", [], 30)
    leaf_key, leaf_pem = make_node_cert(ca_key, ca_pem, "n", [], 30)
    with pytest.raises(CertError, match="is not a CA"):
        make_node_cert(leaf_key, leaf_pem, "m", [], 30)


def test_write_bundle_modes_and_refusal_to_overwrite(tmp_path):
    ca_key, ca_pem = make_ca("CA", 30)
    key_pem, cert_pem = make_node_cert(ca_key, ca_pem, "n", [], 30)
    written = write_bundle(tmp_path / "n", "n", key_pem, cert_pem, ca_cert_pem=ca_pem)
    assert [p.name for p in written] == ["n.key", "n.crt", "ca.crt"]
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [0o600, 0o644, 0o644]
    assert stat.S_IMODE((tmp_path / "n").stat().st_mode) == 0o700
    key2, cert2 = make_node_cert(ca_key, ca_pem, "n", [], 30)
    with pytest.raises(FileExistsError) as err:
        write_bundle(tmp_path / "n", "n", key2, cert2, ca_cert_pem=ca_pem)
    assert err.value.filename == str(tmp_path / "n" / "n.key") and "already exists" in str(err.value)
    assert (tmp_path / "n" / "n.key").read_bytes() == key_pem  # untouched
    assert write_bundle(tmp_path / "n", "n", key2, cert2, ca_cert_pem=ca_pem, force=True) == written[:2]
    assert (tmp_path / "n" / "n.key").read_bytes() == key2
    assert stat.S_IMODE((tmp_path / "n" / "n.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["ca.crt", "n.crt", "n.key"]  # no temporaries


# ----------------------------------------------------------------------------- loading

def test_load_tls_files_accepts_a_matching_set(pki):
    material = load_tls_files(pki["server"])
    assert material.ca_pem == pki["ca"][1] and b"PRIVATE KEY" in material.key_pem


def _mixed(pki, tmp_path, what):
    """Node files with one part wrong: the CA, the key or a file's content."""
    server, stranger = pki["server"], pki["stranger"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate\n")
    return {
        "other CA's cert": (TlsFiles(server.ca, stranger.cert, stranger.key), "not signed by the CA"),
        "mismatched key": (TlsFiles(server.ca, server.cert, stranger.key), "does not belong to the certificate"),
        "garbage cert": (TlsFiles(server.ca, garbage, server.key), f"{garbage}: not a PEM certificate"),
        "garbage key": (TlsFiles(server.ca, server.cert, garbage), f"{garbage}: not a PEM private key"),
        "garbage CA": (TlsFiles(garbage, server.cert, server.key), f"{garbage}: not a PEM certificate"),
        "leaf as CA": (TlsFiles(server.cert, server.cert, server.key), "is not a CA certificate"),
        "missing key": (TlsFiles(server.ca, server.cert, tmp_path / "nope.key"), "nope.key: no such file"),
        "directory": (TlsFiles(server.ca, tmp_path, server.key), "is a directory"),
    }[what]


@pytest.mark.parametrize("what", ["other CA's cert", "mismatched key", "garbage cert", "garbage key", "garbage CA",
                                  "leaf as CA", "missing key", "directory"])
def test_load_tls_files_names_the_problem(pki, tmp_path, what):
    files, message = _mixed(pki, tmp_path, what)
    with pytest.raises(CertError, match=message.replace(".", r"\.")) as err:
        load_tls_files(files)
    assert isinstance(err.value, ValueError)


def test_an_expired_or_future_certificate_is_refused(pki):
    cert = x509.load_pem_x509_certificate(pki["server"].cert.read_bytes())
    check_valid_now(cert, "server.crt")
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=31)
    with pytest.raises(CertError, match="server.crt: the certificate expired on"):
        check_valid_now(cert, "server.crt", now=later)
    with pytest.raises(CertError, match="not valid until"):
        check_valid_now(cert, "server.crt", now=later - dt.timedelta(days=400))


# ----------------------------------------------------------------------------- gRPC

async def _health_check(server_files: TlsFiles, client_credentials: grpc.ChannelCredentials | None) -> int:
    """The health status a client with ``client_credentials`` (None: plaintext) gets from a
    grpc.aio server on 127.0.0.1 that serves with ``server_files``."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(server_files))
    await server.start()
    target = f"127.0.0.1:{port}"  # dialed by address: the server's SAN must hold 127.0.0.1
    try:
        channel = (grpc.aio.insecure_channel(target) if client_credentials is None
                   else grpc.aio.secure_channel(target, client_credentials))
        async with channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        return reply.status
    finally:
        await server.stop(None)


def test_grpc_mutual_tls_between_two_nodes_of_one_ca(pki):
    status = asyncio.run(_health_check(pki["server"], channel_credentials(pki["client"])))
    assert status == health_pb2.HealthCheckResponse.SERVING


def _client_credentials(pki, who):
    client, stranger = pki["client"], pki["stranger"]
    if who == "plaintext":
        return None
    if who == "no client certificate":
        return grpc.ssl_channel_credentials(root_certificates=client.ca.read_bytes())
    # trusts the cluster CA but presents a certificate of another CA
    return grpc.ssl_channel_credentials(root_certificates=client.ca.read_bytes(),
                                        private_key=stranger.key.read_bytes(),
                                        certificate_chain=stranger.cert.read_bytes())


@pytest.mark.parametrize("who", ["no client certificate", "other CA's client certificate", "plaintext"])
def test_grpc_server_refuses_a_client_without_a_cluster_certificate(pki, who):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_health_check(pki["server"], _client_credentials(pki, who)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_client_refuses_a_server_not_issued_for_the_dialed_address(pki):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_health_check(pki["elsewhere"], channel_credentials(pki["client"])))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ----------------------------------------------------------------------------- ssl contexts (relay)

async def _echo(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, payload: bytes) -> tuple[bytes, int]:
    """(what came back, how many connections the server's handler saw)."""
    handled = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handled.append(True)
        writer.write(await reader.readexactly(len(payload)))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async def talk() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            try:
                writer.write(payload)
                await writer.drain()
                return await reader.readexactly(len(payload))
            finally:
                writer.close()
        try:
            return await asyncio.wait_for(talk(), TIMEOUT), len(handled)
        except (OSError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.1)
            return b"", len(handled)
    finally:
        server.close()
        await server.wait_closed()


def test_relay_contexts_echo_between_two_nodes(pki):
    server_ctx, _ = ssl_contexts(pki["server"])
    _, client_ctx = ssl_contexts(pki["client"])
    assert server_ctx.verify_mode == ssl.CERT_REQUIRED and client_ctx.verify_mode == ssl.CERT_REQUIRED
    assert client_ctx.check_hostname and server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # the certificates pass OpenSSL's strict checks too
    assert asyncio.run(_echo(server_ctx, client_ctx, b"relay bytes")) == (b"relay bytes", 1)


def test_relay_server_refuses_a_client_without_a_certificate(pki):
    server_ctx, _ = ssl_contexts(pki["server"])
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=pki["client"].ca)
    assert asyncio.run(_echo(server_ctx, bare, b"hello")) == (b"", 0)


def test_relay_client_refuses_a_server_of_another_ca(pki):
    server_ctx, _ = ssl_contexts(pki["stranger"])
    _, client_ctx = ssl_contexts(pki["client"])
    assert asyncio.run(_echo(server_ctx, client_ctx, b"hello")) == (b"", 0)


# ----------------------------------------------------------------------------- edgeheads certs

def test_certs_command_makes_a_ca_then_a_node(tmp_path, capsys):
    ca_dir, node_dir = tmp_path / "ca", tmp_path / "node"
    assert main(["certs", "ca", "--out", str(ca_dir), "--days", "30", "--name", "test CA"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {ca_dir / 'ca.key'}", f"wrote {ca_dir / 'ca.crt'}"]
    assert main(["certs", "node", "w1", "--ca-dir", str(ca_dir), "--out", str(node_dir), "--host", "127.0.0.1",
                 "--host", "w1.lan"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {node_dir / name}" for name in ("w1.key", "w1.crt",
                                                                                             "ca.crt")]
    assert sorted(p.name for p in node_dir.iterdir()) == ["ca.crt", "w1.crt", "w1.key"]  # never the CA key
    assert stat.S_IMODE((node_dir / "w1.key").stat().st_mode) == 0o600
    files = TlsFiles.in_directory(node_dir, "w1")
    load_tls_files(files)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["w1", "w1.lan"]
    # a second node into the same directory: the identical ca.crt is no conflict
    assert main(["certs", "node", "w2", "--ca-dir", str(ca_dir), "--out", str(node_dir)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {node_dir / 'w2.key'}", f"wrote {node_dir / 'w2.crt'}"]


@pytest.mark.parametrize("argv,code,message", [
    (["certs", "ca", "--out", "{ca}"], 1, "{ca}/ca.key: already exists (--force replaces it)"),
    (["certs", "node", "w1", "--ca-dir", "{empty}", "--out", "{out}"], 1, "no CA in {empty}"),
    (["certs", "node", "w1", "--ca-dir", "{ca}", "--out", "{out}", "--host", "not a host"], 1,
     "host 'not a host' is neither an IP address nor a DNS name"),
    (["certs", "node", "../w1", "--ca-dir", "{ca}", "--out", "{out}"], 2, "node name '../w1'"),
    (["certs", "node", "ca", "--ca-dir", "{ca}", "--out", "{out}"], 2, "cannot be named 'ca'"),
], ids=["ca exists", "no CA", "bad host", "bad name", "named ca"])
def test_certs_command_errors(tmp_path, capsys, argv, code, message):
    dirs = {"ca": tmp_path / "ca", "empty": tmp_path / "empty", "out": tmp_path / "out"}
    assert main(["certs", "ca", "--out", str(dirs["ca"])]) == 0
    before = (dirs["ca"] / "ca.key").read_bytes()
    capsys.readouterr()
    assert main([arg.format(**dirs) for arg in argv]) == code
    captured = capsys.readouterr()
    assert captured.err.startswith("edgeheads: error: ") and message.format(**dirs) in captured.err, captured.err
    assert captured.out == "" and not dirs["out"].exists()
    assert (dirs["ca"] / "ca.key").read_bytes() == before


def test_certs_ca_force_replaces(tmp_path, capsys):
    assert main(["certs", "ca", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "ca.crt").read_bytes()
    assert main(["certs", "ca", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() != before
