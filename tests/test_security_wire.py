"""Mutual TLS and the cluster token on the wire, in one process over loopback: a daemon's gRPC
server (edgeheads.common.server.Daemon), the channels every client opens
(edgeheads.common.channels), and a worker's relay TCP port with the links that dial it."""

from __future__ import annotations

import asyncio
import logging
import ssl
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeheads.common import health_cli
from edgeheads.common.certs import make_ca, make_node_cert, write_bundle
from edgeheads.common.channels import open_channel, open_sync_channel
from edgeheads.common.config import GrpcSettings
from edgeheads.common.relay_transport import LinkError, Role, connect
from edgeheads.common.relay_wire import Kind, encode_hello, encode_message, read_frame
from edgeheads.common.security import PLAINTEXT, Security, SecuritySettings, load_security
from edgeheads.common.server import Daemon
from edgeheads.common.tls import TlsFiles
from edgeheads.common.wire import tensor_to_proto
from edgeheads.v1 import tensor_pb2, worker_pb2
from edgeheads.worker.relay_endpoint import RelayEndpoint
from edgeheads.worker.relay_port import RelayPort

TOKEN = "cluster-token-0123456789abcdef"
LIMIT = 1 << 20
TIMEOUT = 10


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, TlsFiles]:
    """The cluster's node and client bundles (127.0.0.1), and a stranger's from another CA."""
    out = tmp_path_factory.mktemp("pki")
    bundles = {}
    for ca_name, names in (("cluster", ("node", "client")), ("stranger", ("rogue",))):
        ca_key, ca_cert = make_ca(f"{ca_name} CA", 30)
        for name in names:
            key, cert = make_node_cert(ca_key, ca_cert, name, ["127.0.0.1"], 30)
            write_bundle(out / ca_name, name, key, cert, ca_cert_pem=ca_cert)
            bundles[name] = TlsFiles.in_directory(out / ca_name, name)
    return bundles


def secured(files: TlsFiles | None, token: str | None = TOKEN) -> Security:
    if files is None:
        return Security(None, token)
    return load_security(SecuritySettings(tls_dir=files.ca.parent, tls_name=files.cert.stem, token=token))


def with_daemon(server_security: Security, test, listen: str = "127.0.0.1:0"):
    async def go():
        daemon = Daemon(listen, [], security=server_security)
        address = await daemon.start()
        try:
            return await test(address.replace("0.0.0.0", "127.0.0.1"))
        finally:
            daemon.request_stop()
            await daemon.wait()
    return asyncio.run(go())


async def health(address: str, security: Security) -> int | str:
    """The health status, or the status code name of the refusal."""
    try:
        async with open_channel(address, security=security) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    except grpc.aio.AioRpcError as err:
        return err.code().name
    return reply.status


SERVING = health_pb2.HealthCheckResponse.SERVING


# ----------------------------------------------------------------------------- gRPC

@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_every_call_needs_the_token_and_a_refusal_is_logged_with_the_peer(pki, caplog, tls):
    server = secured(pki["node"] if tls else None)
    client = secured(pki["client"] if tls else None)

    async def test(address):
        with caplog.at_level(logging.WARNING, "edgeheads.common.auth"):
            got = {"token": await health(address, client),
                   "no token": await health(address, Security(client.tls, None)),
                   "wrong token": await health(address, Security(client.tls, "x" * 32))}
        return got
    got = with_daemon(server, test)
    assert got == {"token": SERVING, "no token": "UNAUTHENTICATED", "wrong token": "UNAUTHENTICATED"}
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeheads.common.auth"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("refused an RPC to /grpc.health.v1.Health/Check from ipv4:127.0.0.1:")
    assert lines[0].endswith(": no cluster token") and lines[1].endswith(": a wrong cluster token")
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("who", ["plaintext", "no client certificate", "another CA's certificate"])
def test_a_tls_daemon_refuses_clients_without_a_cluster_certificate(pki, who):
    async def test(address):
        if who == "no client certificate":  # trusts the cluster CA but presents none
            credentials = grpc.ssl_channel_credentials(pki["client"].ca.read_bytes())
            async with grpc.aio.secure_channel(address, credentials) as channel:
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                except grpc.aio.AioRpcError as err:
                    return err.code().name
        return await health(address, PLAINTEXT if who == "plaintext" else secured(pki["rogue"]))
    assert with_daemon(secured(pki["node"]), test) == "UNAVAILABLE"


def test_streams_written_call_by_call_carry_the_token():
    """The relay's gRPC transport writes into a stream after opening it (call.write): the
    client interceptor must pass those writes and the replies through."""
    security = secured(None)

    async def echo(requests, context):
        async for request in requests:
            yield request

    async def run():  # a stream-stream method: an echo on a Daemon with the token check
        daemon = Daemon("127.0.0.1:0", [], security=security)
        handler = grpc.stream_stream_rpc_method_handler(echo)
        daemon.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Echo": handler})])
        address = await daemon.start()
        try:
            async with open_channel(address, security=security) as channel:
                call = channel.stream_stream("/test.Echo/Echo")()
                replies = []
                for word in (b"one", b"two"):
                    await call.write(word)
                    replies.append(await call.read())
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
            async with open_channel(address, security=PLAINTEXT) as channel:
                # No write here: the refusal comes from the headers alone, and a write racing the
                # server's trailers can fail locally with INTERNAL instead of the server's status.
                call = channel.stream_stream("/test.Echo/Echo")()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            return replies
        finally:
            daemon.request_stop()
            await daemon.wait()
    assert asyncio.run(run()) == [b"one", b"two"]


def test_sync_channels_and_edgeheads_health_use_the_settings(pki):
    server, client = secured(pki["node"]), secured(pki["client"])

    async def test(address):
        def sync():
            with open_sync_channel(address, GrpcSettings(), client) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                unary = stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status
                streamed = next(iter(stub.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT))).status
            return (unary, streamed, health_cli.check(address, security=client),
                    health_cli.check(address, security=Security(client.tls, None)),
                    health_cli.check(address, timeout=3))
        return await asyncio.to_thread(sync)
    unary, streamed, ok, no_token, plaintext = with_daemon(server, test)
    assert unary == streamed == SERVING
    assert ok[0] and ok[1].endswith(": SERVING")
    assert not no_token[0] and "refused (no cluster token" in no_token[1], no_token
    assert not plaintext[0] and "unreachable" in plaintext[1], plaintext


def test_listening_beyond_loopback_without_tls_logs_one_warning(caplog):
    async def test(address):
        return await health(address, PLAINTEXT)
    with caplog.at_level(logging.WARNING, "edgeheads.common.server"):
        assert with_daemon(PLAINTEXT, test, listen="0.0.0.0:0") == SERVING
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "0.0.0.0:0 WITHOUT TLS" in warnings[0], warnings


# ----------------------------------------------------------------------------- the relay port

class Endpoint(RelayEndpoint):
    """A worker's relay endpoint that only records the batches peers forward to it."""

    def __init__(self) -> None:
        super().__init__(SimpleNamespace(name="w0"), GrpcSettings())
        self.delivered: list[str] = []
        self.got = asyncio.Event()

    async def deliver(self, batch: worker_pb2.ValueBatch) -> Exception | None:
        self.delivered.append(batch.session)
        self.got.set()
        return None


class Stub:
    def __init__(self, port: int) -> None:
        self.port = port

    async def RelayEndpoint(self, request, **kwargs):
        return worker_pb2.RelayEndpointReply(port=self.port)


def batch(session: str) -> worker_pb2.ValueBatch:
    return worker_pb2.ValueBatch(session=session, epoch=3, values=[
        tensor_pb2.NamedTensor(name="x", tensor=tensor_to_proto(torch.ones(1, 4)))])


async def forward(endpoint: Endpoint, port: int, security: Security, session: str) -> None:
    """Forward one batch through a relay link, as a peer worker does, until the endpoint has it;
    LinkError if the port refuses the link."""
    link = connect("tcp", Role.FORWARD, "127.0.0.1:1", 3, LIMIT, stub=Stub(port), security=security)

    async def refusal() -> None:
        async for reply in link.replies():  # a peer link hears back only refusals
            raise LinkError(reply.error_code, reply.error_message)
        raise LinkError("UNAVAILABLE", "closed")
    endpoint.got.clear()
    try:
        link.send(batch(session))
        delivered, refused = asyncio.ensure_future(endpoint.got.wait()), asyncio.ensure_future(refusal())
        done, _ = await asyncio.wait([delivered, refused], timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        delivered.cancel()
        refused.cancel()
        if refused in done:
            refused.result()
        assert done, "neither delivered nor refused"
    finally:
        link.close()


async def raw_exchange(port: int, data: bytes, context: ssl.SSLContext | None) -> list[tuple[Kind, str]] | str:
    """What a hand-made client gets back: (kind, error code) frames until the port closes, or
    the error that ended the connection."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                       server_hostname="127.0.0.1" if context else None)
        writer.write(data)
        frames = []
        while (frame := await asyncio.wait_for(read_frame(reader, LIMIT), TIMEOUT)) is not None:
            frames.append((frame[0], worker_pb2.DriveReply.FromString(frame[1]).error_code))
        writer.close()
        return frames
    except (OSError, asyncio.IncompleteReadError) as err:
        return type(err).__name__


def with_relay_port(security: Security, test):
    async def go():
        endpoint = Endpoint()
        port = RelayPort(endpoint, LIMIT, security)
        await port.start("127.0.0.1", 0)
        try:
            return await test(endpoint, port.port)
        finally:
            await port.close()
    return asyncio.run(go())


def test_the_relay_port_refuses_plaintext_strangers_and_wrong_tokens_and_serves_on(pki, caplog):
    server, client = secured(pki["node"]), secured(pki["client"])
    hello = encode_hello(Kind.HELLO_FORWARD, 3, TOKEN) + encode_message(Kind.BATCH, batch("plain"))

    async def test(endpoint, port):
        impostor = ssl.create_default_context(cafile=pki["client"].ca)  # trusts the cluster, has another CA's cert
        impostor.load_cert_chain(pki["rogue"].cert, pki["rogue"].key)
        got = {"plaintext hello": await raw_exchange(port, hello, None),
               "another CA": await raw_exchange(port, hello, secured(pki["rogue"]).ssl_contexts[1]),
               "impostor": await raw_exchange(port, hello, impostor)}
        for name, security in (("wrong token", Security(client.tls, "w" * 32)), ("no token", Security(client.tls))):
            with pytest.raises(LinkError) as err:
                await forward(endpoint, port, security, name)
            got[name] = err.value.code
        await forward(endpoint, port, client, "good")
        return got, endpoint.delivered

    with caplog.at_level(logging.WARNING, "edgeheads.worker.relay_port"):
        got, delivered = with_relay_port(server, test)
    # never a frame back: the plaintext hello and the impostor (its certificate is refused after
    # its side of the TLS 1.3 handshake) see the port close; another CA's client refuses the server
    assert got["plaintext hello"] == [] and got["impostor"] == [], got
    assert got["another CA"] == "SSLCertVerificationError", got
    assert got["wrong token"] == got["no token"] == "UNAUTHENTICATED", got
    assert delivered == ["good"]  # nothing from the refused ones, and the port still serves
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeheads.worker.relay_port"]
    assert any("from 127.0.0.1:" in line and "not a TLS client" in line for line in lines), lines
    assert any("TLS handshake broken off by the client" in line for line in lines), lines
    assert any("CERTIFICATE_VERIFY_FAILED): no certificate of the cluster CA" in line for line in lines), lines
    assert any(line.endswith("a wrong cluster token") for line in lines), lines
    assert any(line.endswith("no cluster token") for line in lines), lines


def test_a_plaintext_relay_port_with_a_token_checks_the_hello(caplog):
    async def test(endpoint, port):
        with pytest.raises(LinkError, match="UNAUTHENTICATED"):
            await forward(endpoint, port, PLAINTEXT, "no token")
        await forward(endpoint, port, Security(None, TOKEN), "good")
        return endpoint.delivered
    assert with_relay_port(Security(None, TOKEN), test) == ["good"]


def test_a_relay_link_checks_the_worker_certificate(pki):
    """A peer that dials a relay port with a certificate of another CA is refused by the link itself."""
    async def test(endpoint, port):
        with pytest.raises(LinkError, match="UNAVAILABLE.*(CERTIFICATE_VERIFY_FAILED|certificate verify failed)"):
            await forward(endpoint, port, secured(pki["client"]), "never")
        return endpoint.delivered
    assert with_relay_port(secured(pki["rogue"]), test) == []
