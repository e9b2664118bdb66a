"""The head node's side of relay mode: install each worker's program for an epoch,
keep one Drive stream per worker, start steps and wait for the final value.

Per step the head node sends ``x0`` to the workers that read it and then only waits:
the activations go from worker to worker, and the worker holding the last block
sends the final value back on its Drive stream. An error anywhere comes back the same
way, naming the worker, and fails only that session's step.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from edgeheads.headnode.cluster_errors import ClusterError
from edgeheads.headnode.relay_plan import RelayPlan
from edgeheads.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


def program_request(epoch: int, plan: RelayPlan, worker: str, addresses: dict[str, str]) -> worker_pb2.InstallProgramRequest:
    calls = [worker_pb2.ProgramCall(
        ops=[worker_pb2.StageOp(block_id=str(op.block), inputs=list(op.inputs), output=op.output) for op in c.ops],
        inputs=list(c.inputs), routes=[worker_pb2.Route(destination=d, values=list(v)) for d, v in c.routes])
        for c in plan.programs[worker]]
    peers = {d: addresses[d] for c in plan.programs[worker] for d, _ in c.routes if d}
    return worker_pb2.InstallProgramRequest(epoch=epoch, calls=calls, peers=peers)


class RelayDriver:
    def __init__(self, epoch: int, plan: RelayPlan, stubs: dict[str, worker_pb2_grpc.WorkerStub],
                 step_timeout_seconds: float) -> None:
        self.epoch = epoch
        self.plan = plan
        self.stubs = stubs
        self.step_timeout_seconds = step_timeout_seconds
        self.drives: dict[str, grpc.aio.StreamStreamCall] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.readers: list[asyncio.Task] = []
        self.pending: dict[tuple[str, int], asyncio.Future] = {}

    async def start(self, addresses: dict[str, str]) -> None:
        """Install every program, then open the Drive streams."""
        async def install(worker: str) -> None:
            try:
                await self.stubs[worker].InstallProgram(program_request(self.epoch, self.plan, worker, addresses))
            except grpc.aio.AioRpcError as err:
                raise ClusterError(f"installing epoch {self.epoch} on {worker}: {err.code().name}: "
                                   f"{err.details()}") from None
        await asyncio.gather(*[install(w) for w in self.plan.programs])
        for worker in self.plan.programs:
            call = self.stubs[worker].Drive()
            await call.write(worker_pb2.ValueBatch(epoch=self.epoch))
            self.drives[worker] = call
            self.locks[worker] = asyncio.Lock()
            self.readers.append(asyncio.create_task(self._read(worker, call)))

    async def _read(self, worker: str, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for reply in call:
                future = self.pending.pop((reply.session, reply.position), None)
                if future is None or future.done():
                    continue
                if reply.error_code:
                    future.set_exception(ClusterError(f"{reply.error_code}: {reply.error_message}"))
                else:
                    future.set_result(({nt.name: nt.tensor for nt in reply.values}, reply.path_compute_seconds))
            reason = "closed its drive stream"
        except grpc.aio.AioRpcError as err:
            reason = f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            return
        self._fail_all(f"worker {worker} {reason}")

    def _fail_all(self, message: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ClusterError(message))
        self.pending.clear()

    async def step(self, session: str, position: int, x0: tensor_pb2.Tensor) -> tuple[tensor_pb2.Tensor, float]:
        """The final value, and the compute seconds on the step's critical path."""
        key = (session, position)
        if key in self.pending:
            raise ClusterError(f"session {session} already has a step at position {position} in flight")
        future = self.pending[key] = asyncio.get_running_loop().create_future()
        batch = worker_pb2.ValueBatch(session=session, epoch=self.epoch, position=position,
                                      values=[tensor_pb2.NamedTensor(name="x0", tensor=x0)])
        try:
            for worker in self.plan.head_sends:
                async with self.locks[worker]:
                    await self.drives[worker].write(batch)
            values, path_compute = await asyncio.wait_for(future, self.step_timeout_seconds)
        except asyncio.TimeoutError:
            raise ClusterError(f"session {session}: no result within {self.step_timeout_seconds:.0f} s "
                               f"(position {position})") from None
        except grpc.aio.AioRpcError as err:
            raise ClusterError(f"session {session}: sending the step failed: {err.code().name}") from None
        finally:
            self.pending.pop(key, None)
        return values[self.plan.final], path_compute

    async def close(self) -> None:
        for call in self.drives.values():
            try:
                await call.done_writing()
            except grpc.aio.AioRpcError:
                pass
        for task in self.readers:
            task.cancel()
        self._fail_all(f"epoch {self.epoch} closed")
