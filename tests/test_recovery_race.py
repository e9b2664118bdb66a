"""A channel closed under a call in flight, as a recovery's probe did when it replaced the
channel of a worker that did not answer (WorkerChannels.reopen): grpc.aio then raises
asyncio.CancelledError in the task awaiting the call, which the head node took for that
task's own cancellation (a client gone away): the step's session ended, and its Generate
call was left without a status until the head node stopped ("UNAVAILABLE: Cancelling all
calls" at the client, in tests/test_recovery.py). So a replaced channel is closed only once
its calls had time to end on their own, and a call cancelled by a closing channel is a
failed call (ClusterError: recovery, then the step again), never a cancellation.

Real gRPC calls to an in-process fake worker whose handlers wait until the test lets them
answer, so every interleaving is forced by events, not timing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from edgeheads.common.config import GrpcSettings
from edgeheads.headnode import channels as channels_module
from edgeheads.headnode.channels import WorkerChannels
from edgeheads.headnode.cluster_errors import ClusterError
from edgeheads.headnode.relay_driver import RelayDriver
from edgeheads.headnode.relay_plan import RelayPlan
from edgeheads.headnode.sessions import SessionTable
from edgeheads.v1 import worker_pb2, worker_pb2_grpc


class HeldWorker(worker_pb2_grpc.WorkerServicer):
    """Every call waits for ``release``; ``entered`` is set once one arrived."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def _hold(self) -> None:
        self.entered.set()
        await self.release.wait()

    async def GetTelemetry(self, request, context):
        await self._hold()
        return worker_pb2.WorkerTelemetry(blocks=["L0.attn.g0"])

    async def InstallProgram(self, request, context):
        await self._hold()
        return worker_pb2.InstallProgramReply(calls=len(request.calls))

    async def DropSession(self, request, context):
        await self._hold()
        return worker_pb2.DropSessionReply()


async def _serve() -> tuple[grpc.aio.Server, HeldWorker, str]:
    worker = HeldWorker()
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, worker, f"127.0.0.1:{port}"


PLAN = RelayPlan(programs={"w": []}, head_sends={}, final="x", final_worker="w", phases=1)


def test_a_channel_replaced_under_a_call_lets_the_call_end_on_its_own():
    """The race: a step's call to a worker is in flight when the recovery's probe replaces
    that worker's channel. The call ends with its own answer, not CancelledError."""
    async def run() -> None:
        server, worker, address = await _serve()
        channels = WorkerChannels(GrpcSettings())
        try:
            old = channels.stub("w", address)
            call = asyncio.ensure_future(old.GetTelemetry(worker_pb2.TelemetryRequest(), timeout=20))
            await asyncio.wait_for(worker.entered.wait(), 10)
            new = channels.reopen("w")  # as probe() does for a worker found UNAVAILABLE
            assert new is not old and channels.stubs["w"] is new
            await asyncio.sleep(0.2)  # the old channel's close, when it was closed at once, has run
            worker.release.set()
            reply = await asyncio.wait_for(call, 10)
            assert list(reply.blocks) == ["L0.attn.g0"]
            assert list((await new.GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10)).blocks)
        finally:
            await asyncio.wait_for(channels.close(), 5)  # the retired channel too, without its grace
            await server.stop(None)
        assert not channels._retired and not channels._closing
    asyncio.run(run())


def test_a_retired_channel_is_closed_after_its_grace(monkeypatch):
    monkeypatch.setattr(channels_module, "RETIRE_GRACE_SECONDS", 0.05)

    async def run() -> None:
        server, worker, address = await _serve()
        worker.release.set()
        channels = WorkerChannels(GrpcSettings())
        try:
            channels.stub("w", address)
            old = channels.channels["w"]
            channels.reopen("w")
            assert channels._retired == [old]
            await asyncio.wait_for(asyncio.gather(*channels._closing), 5)
            assert not channels._retired
            with pytest.raises(grpc.aio.UsageError):  # closed: it takes no new call
                await worker_pb2_grpc.WorkerStub(old).GetTelemetry(worker_pb2.TelemetryRequest(), timeout=5)
        finally:
            await channels.close()
            await server.stop(None)
    asyncio.run(run())


def test_installing_a_program_over_a_channel_closed_under_it_is_a_cluster_error():
    """What a step's reopening of the relay drives (RelayDataflow._reopen) meets when the
    channel closes under InstallProgram: a failed call, which the step hands to recovery."""
    async def run() -> None:
        server, worker, address = await _serve()
        channels = WorkerChannels(GrpcSettings())
        try:
            channels.stub("w", address)
            driver = RelayDriver(1, PLAN, channels.stubs, 10.0)
            start = asyncio.ensure_future(driver.start({"w": address}))
            await asyncio.wait_for(worker.entered.wait(), 10)
            await channels.channels["w"].close()  # what closing the channel at once did
            with pytest.raises(ClusterError, match="installing epoch 1 on w: the call was cancelled"):
                await asyncio.wait_for(start, 10)
        finally:
            await channels.close()
            await server.stop(None)
    asyncio.run(run())


def test_a_step_cancelled_while_installing_a_program_is_still_cancelled():
    """A client that goes away still cancels its step: only a CancelledError that the task
    did not receive itself counts as a failed call."""
    async def run() -> None:
        server, worker, address = await _serve()
        channels = WorkerChannels(GrpcSettings())
        try:
            channels.stub("w", address)
            driver = RelayDriver(1, PLAN, channels.stubs, 10.0)
            start = asyncio.ensure_future(driver.start({"w": address}))
            await asyncio.wait_for(worker.entered.wait(), 10)
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
        finally:
            await channels.close()
            await server.stop(None)
    asyncio.run(run())


def test_dropping_caches_over_a_channel_closed_under_it_ends_the_session():
    async def run() -> None:
        server, worker, address = await _serve()
        channels = WorkerChannels(GrpcSettings())
        forgotten = []

        async def forget(wire: str) -> None:
            forgotten.append(wire)

        try:
            channels.stub("w", address)
            table = SessionTable(channels.stubs, forget)
            table.open("s", SimpleNamespace(number=1, plan=SimpleNamespace(workers=["w"])))
            end = asyncio.ensure_future(table.end("s", None))
            await asyncio.wait_for(worker.entered.wait(), 10)
            await channels.channels["w"].close()
            await asyncio.wait_for(end, 10)  # no CancelledError: a warning, like a worker that is gone
            assert "s" not in table and forgotten == ["s"]
        finally:
            await channels.close()
            await server.stop(None)
    asyncio.run(run())
