"""The head dataflow: the head node forwards every value between phases.

Each session has one bidirectional ``RunCall`` stream per worker of its epoch, opened
at its first step (so two sessions' replies never cross). A phase writes one request
per call (the call's ops and inputs) and reads one reply per call (its returns). The
head node needs no worker-to-worker connectivity, so this suits boards that can reach
only the head node; it is also the baseline for the relay figures.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import torch

from edgeheads.common.wire import tensor_from_proto, tensor_to_proto
from edgeheads.headnode.cluster_errors import ClusterError
from edgeheads.headnode.dataflow import StepStats
from edgeheads.headnode.sessions import Epoch
from edgeheads.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc


@dataclass
class _Streams:
    epoch: int
    by_worker: dict[str, grpc.aio.StreamStreamCall] = field(default_factory=dict)


async def _failed(err: BaseException):
    raise err


class HeadDataflow:
    label = name = "head"

    def __init__(self, stubs: dict[str, worker_pb2_grpc.WorkerStub], stats: StepStats,
                 step_timeout_seconds: float = 60.0) -> None:
        self.stubs = stubs
        self.stats = stats
        self.step_timeout_seconds = step_timeout_seconds
        self.epoch: Epoch | None = None
        self.ops: list[list[list[worker_pb2.BlockOp]]] = []  # phase -> call -> ops, built once per epoch
        self.streams: dict[str, _Streams] = {}  # session -> its streams

    async def switch(self, epoch: Epoch) -> None:
        self.ops = [[[worker_pb2.BlockOp(block_id=str(op.block), inputs=list(op.inputs), output=op.output)
                      for op in call.ops] for call in phase.calls] for phase in epoch.plan.phases]
        self.epoch = epoch

    async def _streams_for(self, session: str, epoch: Epoch) -> dict[str, grpc.aio.StreamStreamCall]:
        streams = self.streams.get(session)
        if streams is not None and streams.epoch != epoch.number:  # the placement changed since its last step
            await self.forget(session)
            streams = None
        if streams is None:
            streams = self.streams[session] = _Streams(epoch.number,
                                                       {w: self.stubs[w].RunCall() for w in epoch.plan.workers})
        return streams.by_worker

    async def step(self, session: str, position: int, x0: torch.Tensor, reserve_tokens: int = 0) -> torch.Tensor:
        """x0: (1, T, D) -> the final value (1, T, D). ClusterError when a worker fails or the
        step takes longer than ``step_timeout_seconds`` (a hung worker must not hold the step
        gate, and with it every migration, for ever)."""
        try:
            return await asyncio.wait_for(self._step(session, position, x0, reserve_tokens), self.step_timeout_seconds)
        except asyncio.TimeoutError:
            raise ClusterError(f"session {session}: no result within {self.step_timeout_seconds:g} s "
                               f"(position {position})") from None

    async def _step(self, session: str, position: int, x0: torch.Tensor, reserve_tokens: int) -> torch.Tensor:
        epoch, ops = self.epoch, self.ops
        assert epoch is not None, "no epoch yet"
        streams = await self._streams_for(session, epoch)
        # values stay in wire form between phases: the head node only forwards them
        values: dict[str, tensor_pb2.Tensor] = {"x0": tensor_to_proto(x0)}
        loop = asyncio.get_running_loop()
        for phase, phase_ops in zip(epoch.plan.phases, ops):
            t0 = loop.time()
            requests = [(call.worker, worker_pb2.CallRequest(
                session=session, epoch=epoch.number, position=position, reserve_tokens=reserve_tokens,
                inputs=[tensor_pb2.NamedTensor(name=n, tensor=values[n]) for n in call.inputs],
                ops=call_ops, return_values=call.returns)) for call, call_ops in zip(phase.calls, phase_ops)]
            written = await asyncio.gather(*[self._write(streams[w], w, session, r) for w, r in requests],
                                           return_exceptions=True)
            # read the reply of every call sent before failing: then no call of this step is
            # still running on a worker when the session's caches are dropped
            replies = await asyncio.gather(*[self._read(streams[w], w, session) if ok is None else _failed(ok)
                                             for (w, _), ok in zip(requests, written)], return_exceptions=True)
            failed = next((r for r in replies if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
            slowest = 0.0
            for reply in replies:
                for out in reply.outputs:
                    values[out.name] = out.tensor
                slowest = max(slowest, reply.compute_seconds)
            self.stats.phase(self.label, loop.time() - t0, slowest)
        return tensor_from_proto(values[epoch.plan.final], epoch.plan.final)

    @staticmethod
    async def _write(stream: grpc.aio.StreamStreamCall, worker: str, session: str,
                     request: worker_pb2.CallRequest) -> None:
        try:
            await stream.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
            raise ClusterError(f"worker {worker}: sending a call of session {session} failed: {err}") from None

    @staticmethod
    async def _read(stream: grpc.aio.StreamStreamCall, worker: str, session: str) -> worker_pb2.CallReply:
        try:
            reply = await stream.read()
        except grpc.aio.AioRpcError:
            reply = grpc.aio.EOF
        if reply is grpc.aio.EOF:
            raise ClusterError(f"worker {worker} ended session {session}: "
                               f"{(await stream.code()).name}: {await stream.details()}")
        return reply

    async def forget(self, session: str) -> None:
        streams = self.streams.pop(session, None)
        if streams is None:
            return
        for stream in streams.by_worker.values():
            try:
                await stream.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                stream.cancel()

    async def close(self) -> None:
        for session in list(self.streams):
            await self.forget(session)
