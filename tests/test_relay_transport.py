"""One relay transport for both sides: the links of edgeheads.common.relay_transport (TCP
frames and gRPC streams) against a real worker front end (the gRPC servicer and the relay
TCP port, both over one RelayEndpoint) on loopback; the head node's RelayDriver and the
workers' PeerLinks both dial through them."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from edgeheads.common.config import GrpcSettings
from edgeheads.common.relay_transport import GrpcLink, LinkError, RelayLink, Role, TcpLink, connect
from edgeheads.common.wire import WireError, tensor_to_proto
from edgeheads.headnode.relay_driver import RelayDriver
from edgeheads.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from edgeheads.worker.peers import PeerLinks
from edgeheads.worker.relay_endpoint import RelayEndpoint
from edgeheads.worker.relay_port import RelayPort
from edgeheads.worker.relay_service import RelayRpcs

LIMIT = 1 << 20
LINK_CLASS = {"tcp": TcpLink, "grpc": GrpcLink}


class Endpoint(RelayEndpoint):
    """A worker's relay endpoint with a stand-in block runner: x0 comes back as the final
    value x1 on the epoch's drive; session "bad" has malformed values."""

    def __init__(self) -> None:
        super().__init__(SimpleNamespace(name="w0"), GrpcSettings())
        self.delivered: asyncio.Queue = asyncio.Queue()
        self.installed: list[tuple[int, str]] = []

    def install(self, epoch, calls, peers, transport="") -> None:
        self.installed.append((epoch, transport))

    async def deliver(self, batch: worker_pb2.ValueBatch) -> Exception | None:
        if batch.session == "bad":
            self.report(batch, "INVALID_ARGUMENT", "tensor x0: 3 bytes do not match")
            return WireError("tensor x0: 3 bytes do not match")
        self.delivered.put_nowait((batch.session, batch.epoch, batch.position))
        self.to_head(batch.epoch, worker_pb2.DriveReply(
            session=batch.session, epoch=batch.epoch, position=batch.position,
            values=[tensor_pb2.NamedTensor(name="x1", tensor=batch.values[0].tensor)]))
        return None


class Servicer(RelayRpcs, worker_pb2_grpc.WorkerServicer):
    def __init__(self, endpoint: RelayEndpoint, port: RelayPort) -> None:
        self.relay = endpoint
        self.relay_port = port


class Worker:
    """The relay front ends of one worker: gRPC and the TCP port, over one endpoint."""

    async def start(self) -> Worker:
        self.endpoint = Endpoint()
        self.port = RelayPort(self.endpoint, LIMIT)
        await self.port.start("127.0.0.1", 0)
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(Servicer(self.endpoint, self.port), self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        return self

    async def stop(self) -> None:
        await self.port.close()
        await self.server.stop(0)

    async def close(self) -> None:
        await self.stop()
        await self.channel.close()


def batch(session: str, epoch: int = 7, position: int = 0) -> worker_pb2.ValueBatch:
    return worker_pb2.ValueBatch(session=session, epoch=epoch, position=position,
                                 values=[tensor_pb2.NamedTensor(name="x0", tensor=tensor_to_proto(torch.ones(1, 4)))])


def with_worker(test):
    async def go():
        worker = await Worker().start()
        try:
            return await test(worker)
        finally:
            await worker.close()
    return asyncio.run(go())


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_a_drive_link_carries_batches_out_and_replies_back_then_breaks_with_the_worker(transport):
    async def test(worker):
        link = connect(transport, Role.DRIVE, worker.address, 7, LIMIT, stub=worker.stub)
        assert isinstance(link, LINK_CLASS[transport])
        link.send(batch("early"))  # before the link is open: it waits for it
        await link.opened()
        link.send(batch("s", position=3))
        link.send(batch("bad", position=4))
        replies = link.replies()
        got = [await asyncio.wait_for(replies.__anext__(), 10) for _ in range(3)]
        assert [(r.session, r.position, r.error_code) for r in got] == [
            ("early", 0, ""), ("s", 3, ""), ("bad", 4, "INVALID_ARGUMENT")]
        assert got[0].values[0].name == "x1" and link.sent_epoch == 7 and link.unsent() == []
        await worker.stop()  # the worker goes away: the link ends, and later sends are refused
        with pytest.raises((LinkError, StopAsyncIteration)):
            await asyncio.wait_for(replies.__anext__(), 10)
        with pytest.raises(ConnectionError):
            link.send(batch("s", position=5))
        link.close()
    with_worker(test)


async def _forward_link_after_a_bad_batch(worker, transport):
    """A forward link that delivered one batch and then sent a malformed one: (link, replies)."""
    link = connect(transport, Role.FORWARD, worker.address, 7, LIMIT,
                   channel_options=GrpcSettings().channel_options())  # its own channel, as a peer's
    link.send(batch("s", position=1))
    assert await asyncio.wait_for(worker.endpoint.delivered.get(), 10) == ("s", 7, 1)
    link.send(batch("bad", position=2))
    return link, link.replies()


def test_a_forward_link_over_tcp_delivers_and_a_bad_batch_fails_only_its_step():
    async def test(worker):
        link, replies = await _forward_link_after_a_bad_batch(worker, "tcp")
        reply = await asyncio.wait_for(replies.__anext__(), 10)  # a refusal names the step
        assert (reply.session, reply.position, reply.error_code) == ("bad", 2, "INVALID_ARGUMENT")
        link.send(batch("s", position=3))  # and the connection goes on
        assert await asyncio.wait_for(worker.endpoint.delivered.get(), 10) == ("s", 7, 3)
        link.close()
    with_worker(test)


def test_a_forward_link_over_grpc_delivers_and_a_bad_batch_ends_its_stream_with_a_status():
    async def test(worker):
        link, replies = await _forward_link_after_a_bad_batch(worker, "grpc")
        with pytest.raises(LinkError) as err:  # a corrupt message drops the stream, with its status
            await asyncio.wait_for(replies.__anext__(), 10)
        assert err.value.code == "INVALID_ARGUMENT"
        link.close()
    with_worker(test)


def test_an_oversized_batch_is_refused_before_it_is_written():
    async def test(worker):
        link = connect("tcp", Role.FORWARD, worker.address, 7, 256, stub=worker.stub)
        big = batch("s")
        big.values[0].tensor.CopyFrom(tensor_to_proto(torch.ones(1, 64)))
        with pytest.raises(ValueError, match="exceeds the limit"):
            link.send(big)
        link.send(batch("s", position=1))  # the link goes on
        assert await asyncio.wait_for(worker.endpoint.delivered.get(), 10) == ("s", 7, 1)
        link.close()
    with_worker(test)


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_the_driver_and_the_peer_links_dial_through_the_same_links(transport):
    async def test(worker):
        plan = SimpleNamespace(programs={"w0": []}, head_sends=["w0"], final="x1")
        driver = RelayDriver(7, plan, {"w0": worker.stub}, step_timeout_seconds=30, transport=transport,
                             max_message_bytes=LIMIT)
        await driver.start({"w0": worker.address})
        assert worker.endpoint.installed == [(7, transport)]
        assert isinstance(driver.links["w0"], LINK_CLASS[transport])
        x0 = tensor_to_proto(torch.arange(4.0).reshape(1, 4))
        assert (await driver.step("s", 0, x0))[0] == x0
        await worker.endpoint.delivered.get()

        errors: list[tuple[worker_pb2.ValueBatch, str]] = []
        reported = asyncio.Event()
        peers = PeerLinks(GrpcSettings(), lambda b, message: (errors.append((b, message)), reported.set()))
        peers.update({"w0": worker.address}, transport)
        peers.send("w0", batch("s", position=1))
        assert isinstance(peers.link("w0"), LINK_CLASS[transport])
        assert await asyncio.wait_for(worker.endpoint.delivered.get(), 10) == ("s", 7, 1)

        await worker.stop()  # both ends learn at once: the drive fails the epoch, the peer link reports
        await asyncio.wait_for(asyncio.gather(*driver.readers), 10)
        assert "w0" in driver.broken
        await asyncio.wait_for(reported.wait(), 10)
        assert [(b.session, b.epoch) for b, _ in errors] == [("", 7)]  # batches written may be lost
        assert peers.link("w0") is None  # the next send opens a new link
        await peers.close()
        await driver.close()
    with_worker(test)


def test_no_relay_code_dials_on_its_own():
    """The driver and the peer links hold no transport code of their own."""
    root = Path(__file__).resolve().parent.parent
    for path in ("headnode/relay_driver.py", "worker/peers.py"):
        source = (root / path).read_text()
        for word in ("open_connection", ".Drive(", ".Forward(", "RelayEndpointRequest", "insecure_channel",
                     "relay_wire"):
            assert word not in source, f"{path} uses {word}: dial through edgeheads.common.relay_transport"
    assert issubclass(TcpLink, RelayLink) and issubclass(GrpcLink, RelayLink)


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_a_peer_nobody_serves_fails_the_steps_sent_to_it(transport):
    async def test():
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{sock.getsockname()[1]}"
        errors: list[tuple[worker_pb2.ValueBatch, str]] = []
        reported = asyncio.Event()
        peers = PeerLinks(GrpcSettings(), lambda b, message: (errors.append((b, message)), reported.set()))
        peers.update({"w9": address}, transport)
        peers.send("w9", batch("s", position=4))
        await asyncio.wait_for(reported.wait(), 30)
        assert [(b.session, b.position) for b, _ in errors] == [("s", 4)]
        assert "UNAVAILABLE" in errors[0][1] and peers.link("w9") is None
        await peers.close()
    asyncio.run(test())
