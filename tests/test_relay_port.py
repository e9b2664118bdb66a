"""The relay TCP port and the head node's side of it, in one process over real loopback
sockets, with a stand-in for the worker's block runner: how a broken or refused frame
is answered, who is told, and that a broken drive fails later steps at once."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest
import torch

from edgeheads.headnode.cluster_errors import ClusterError
from edgeheads.headnode.relay_driver import RelayDriver
from edgeheads.v1 import tensor_pb2, worker_pb2
from edgeheads.worker import relay_port as relay_port_module
from edgeheads.worker.relay_endpoint import RelayEndpoint
from edgeheads.worker.relay_port import RelayPort, listening_socket
from edgeheads.common.config import GrpcSettings
from edgeheads.common.relay_wire import Kind, encode, encode_message, read_frame
from edgeheads.common.wire import WireError, tensor_to_proto

LIMIT = 1 << 20


class Endpoint(RelayEndpoint):
    """A worker's relay endpoint with a stand-in for its block runner: a final value goes
    back to the head node on the epoch's drive; session "bad" has malformed values."""

    def __init__(self) -> None:
        super().__init__(SimpleNamespace(name="w0"), GrpcSettings())
        self.delivered: list[tuple[str, int]] = []
        self.reports: list[tuple[int, str, str]] = []
        self.detached = asyncio.Event()

    async def deliver(self, batch: worker_pb2.ValueBatch) -> Exception | None:
        if not batch.session:
            return await super().deliver(batch)  # refused as the real one does
        if batch.session == "bad":
            self.report(batch, "INVALID_ARGUMENT", "tensor x0: 3 bytes do not match")
            return WireError("tensor x0: 3 bytes do not match")
        self.delivered.append((batch.session, batch.position))
        self.to_head(batch.epoch, worker_pb2.DriveReply(
            session=batch.session, epoch=batch.epoch, position=batch.position,
            values=[tensor_pb2.NamedTensor(name="x1", tensor=batch.values[0].tensor)]))
        return None

    def report(self, batch: worker_pb2.ValueBatch, code: str, message: str) -> None:
        self.reports.append((batch.epoch, batch.session, code))
        super().report(batch, code, message)

    def detach_drive(self, sink) -> None:
        super().detach_drive(sink)
        self.detached.set()


def batch(session: str, epoch: int = 7, position: int = 0) -> worker_pb2.ValueBatch:
    return worker_pb2.ValueBatch(session=session, epoch=epoch, position=position,
                                 values=[tensor_pb2.NamedTensor(name="x0", tensor=tensor_to_proto(torch.ones(1, 4)))])


async def exchange(port: int, data: bytes, close: bool = True) -> list[tuple[Kind, worker_pb2.DriveReply]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if close:
        writer.write_eof()
    frames = []
    try:
        while (frame := await asyncio.wait_for(read_frame(reader, LIMIT), 10)) is not None:
            frames.append((frame[0], worker_pb2.DriveReply.FromString(frame[1])))
    finally:
        writer.close()
    return frames


def with_port(test):
    async def go():
        runner = Endpoint()
        port = RelayPort(runner, LIMIT)
        await port.start("127.0.0.1", 0)
        try:
            return await test(runner, port)
        finally:
            await port.close()
    return asyncio.run(go())


HELLO = encode_message(Kind.HELLO_FORWARD, worker_pb2.ValueBatch(epoch=7))


def corrupt(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 1])


def test_a_corrupt_frame_on_a_live_peer_link_tells_the_head_node_of_its_epoch():
    async def test(runner, port):
        frames = await exchange(port.port, HELLO + encode_message(Kind.BATCH, batch("s", epoch=9))
                                + corrupt(encode_message(Kind.BATCH, batch("s", epoch=9, position=1))))
        assert [(k, r.error_code, r.session) for k, r in frames] == [(Kind.ERROR, "DATA_LOSS", "")]
        assert runner.delivered == [("s", 0)]
        assert runner.reports == [(9, "", "DATA_LOSS")]  # the epoch of the batch, not of the hello
        assert port.frames_received == 1
    with_port(test)


def test_a_corrupt_frame_on_a_fresh_connection_tells_no_one_else():
    async def test(runner, port):
        frames = await exchange(port.port, HELLO + corrupt(encode_message(Kind.BATCH, batch("s"))))
        assert [(k, r.error_code) for k, r in frames] == [(Kind.ERROR, "DATA_LOSS")]
        assert runner.reports == [] and runner.delivered == []
    with_port(test)


def test_bad_values_fail_only_their_step_and_the_connection_goes_on():
    async def test(runner, port):
        frames = await exchange(port.port, HELLO + encode_message(Kind.BATCH, batch("bad"))
                                + encode_message(Kind.BATCH, worker_pb2.ValueBatch(epoch=7))
                                + encode_message(Kind.BATCH, batch("s", position=3)))
        assert [(k, r.error_code, r.session) for k, r in frames] == [
            (Kind.ERROR, "INVALID_ARGUMENT", "bad"), (Kind.ERROR, "INVALID_ARGUMENT", "")]
        assert "name its session" in frames[1][1].error_message
        assert runner.delivered == [("s", 3)]
        assert runner.reports == [(7, "bad", "INVALID_ARGUMENT")]  # by the runner, for that session only
    with_port(test)


def test_a_connection_without_a_hello_times_out_with_a_status(monkeypatch):
    monkeypatch.setattr(relay_port_module, "HELLO_TIMEOUT_SECONDS", 0.2)

    async def test(runner, port):
        frames = await exchange(port.port, b"", close=False)
        assert [(k, r.error_code) for k, r in frames] == [(Kind.ERROR, "DEADLINE_EXCEEDED")]
    with_port(test)


def test_a_drive_connection_carries_replies_and_unregisters_when_it_ends():
    async def test(runner, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port.port)
        writer.write(encode_message(Kind.HELLO_DRIVE, worker_pb2.ValueBatch(epoch=7))
                     + encode_message(Kind.BATCH, batch("s", position=5)))
        kind, payload = await asyncio.wait_for(read_frame(reader, LIMIT), 10)
        reply = worker_pb2.DriveReply.FromString(payload)
        assert (kind, reply.session, reply.position, reply.values[0].name) == (Kind.REPLY, "s", 5, "x1")
        assert runner.has_drive(7)
        writer.close()
        await asyncio.wait_for(runner.detached.wait(), 10)
        assert not runner.has_drive(7)
    with_port(test)


def test_a_wildcard_v6_listen_gives_one_port_for_both_families():
    try:
        sock = listening_socket("[::]", 0)
    except OSError:
        pytest.skip("no IPv6 on this machine")
    port = sock.getsockname()[1]
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as client:
                client.settimeout(5)
                client.connect((host, port))
    finally:
        sock.close()


class Stub:
    """The two Worker RPCs a RelayDriver makes before it opens a drive."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def InstallProgram(self, request, **kwargs):
        return worker_pb2.InstallProgramReply()

    async def RelayEndpoint(self, request, **kwargs):
        return worker_pb2.RelayEndpointReply(port=self.port)


def test_the_driver_runs_steps_and_fails_fast_once_its_drive_broke():
    async def test(runner, port):
        plan = SimpleNamespace(programs={"w0": []}, head_sends=["w0"], final="x1")
        driver = RelayDriver(7, plan, {"w0": Stub(port.port)}, step_timeout_seconds=60, transport="tcp",
                             max_message_bytes=LIMIT)
        await driver.start({"w0": f"127.0.0.1:{port.port}"})
        x0 = tensor_to_proto(torch.arange(4.0).reshape(1, 4))
        final, _ = await driver.step("s", 0, x0)
        assert final == x0
        await port.close()  # the worker goes away
        await asyncio.wait_for(asyncio.gather(*driver.readers), 10)  # a reader ends once its drive broke
        assert driver.broken
        with pytest.raises(ClusterError, match="can no longer run steps"):
            await driver.step("s", 1, x0)
        with pytest.raises(ClusterError, match="exceeds the limit"):
            fresh = RelayDriver(8, plan, {"w0": Stub(port.port)}, 60, "tcp", LIMIT)
            big = tensor_to_proto(torch.zeros(LIMIT // 4 + 1))
            server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            fresh.stubs = {"w0": Stub(server.sockets[0].getsockname()[1])}
            await fresh.start({"w0": "127.0.0.1:1"})
            try:
                await fresh.step("s", 0, big)
            finally:
                await fresh.close()
                server.close()
        await driver.close()
    with_port(test)


def test_frames_with_the_reserved_bytes_set_are_refused():
    async def test(runner, port):
        bad = bytearray(encode(Kind.HELLO_FORWARD, b""))
        bad[6] = 1
        frames = await exchange(port.port, bytes(bad))
        assert [(k, r.error_code) for k, r in frames] == [(Kind.ERROR, "INVALID_ARGUMENT")]
        assert "reserved" in frames[0][1].error_message
    with_port(test)
