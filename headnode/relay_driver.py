"""The head node's side of relay mode: install each worker's program for an epoch,
keep one Drive stream per worker, start steps and wait for the final value.

Per step the head node sends ``x0`` to the workers that read it and then only waits:
the activations go from worker to worker, and the worker holding the last block
sends the final value back on its Drive stream. An error anywhere comes back the same
way, naming the worker, and fails only that session's step. With the ``tcp`` relay
transport (the default) a Drive stream is a TCP connection to the worker's relay port,
carrying the same messages in frames (protos/edgeheads/common/relay_wire.py).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from edgeheads.headnode.cluster_errors import ClusterError
from edgeheads.headnode.relay_plan import RelayPlan
from edgeheads.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from edgeheads.common.relay_wire import Kind, RelayConnection, parse

log = logging.getLogger(__name__)


def program_request(epoch: int, plan: RelayPlan, worker: str, addresses: dict[str, str],
                    transport: str = "tcp") -> worker_pb2.InstallProgramRequest:
    calls = [worker_pb2.ProgramCall(
        ops=[worker_pb2.StageOp(block_id=str(op.block), inputs=list(op.inputs), output=op.output) for op in c.ops],
        inputs=list(c.inputs), routes=[worker_pb2.Route(destination=d, values=list(v)) for d, v in c.routes])
        for c in plan.programs[worker]]
    peers = {d: addresses[d] for c in plan.programs[worker] for d, _ in c.routes if d}
    return worker_pb2.InstallProgramRequest(epoch=epoch, calls=calls, peers=peers, transport=transport)


class _GrpcDrive:
    """A Drive stream: writes serialized by a lock (a stream allows one write at a time)."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.lock = asyncio.Lock()

    async def send(self, batch: worker_pb2.ValueBatch) -> None:
        async with self.lock:
            await self.call.write(batch)

    async def replies(self):
        async for reply in self.call:
            yield Kind.REPLY, reply

    async def close(self) -> None:
        try:
            await self.call.done_writing()
        except grpc.aio.AioRpcError:
            pass


class _TcpDrive:
    """A connection to the worker's relay port: a write never waits."""

    def __init__(self, conn: RelayConnection) -> None:
        self.conn = conn

    async def send(self, batch: worker_pb2.ValueBatch) -> None:
        self.conn.send(Kind.BATCH, batch)

    async def replies(self):
        while (frame := await self.conn.receive()) is not None:
            yield frame[0], parse(worker_pb2.DriveReply, frame[1])

    async def close(self) -> None:
        self.conn.close()



class RelayDriver:
    def __init__(self, epoch: int, plan: RelayPlan, stubs: dict[str, worker_pb2_grpc.WorkerStub],
                 step_timeout_seconds: float, transport: str = "tcp", max_message_bytes: int = 64 << 20) -> None:
        if transport not in ("tcp", "grpc"):
            raise ValueError(f"relay transport must be 'tcp' or 'grpc', not {transport!r}")
        self.epoch = epoch
        self.plan = plan
        self.stubs = stubs
        self.step_timeout_seconds = step_timeout_seconds
        self.transport = transport
        self.max_message_bytes = max_message_bytes
        self.drives: dict[str, _GrpcDrive | _TcpDrive] = {}
        self.readers: list[asyncio.Task] = []
        self.pending: dict[tuple[str, int], asyncio.Future] = {}
        self.broken = ""  # why a drive ended: every later step of this epoch fails at once

    async def start(self, addresses: dict[str, str]) -> None:
        """Install every program, then open the drives."""
        async def install(worker: str) -> None:
            try:
                await self.stubs[worker].InstallProgram(
                    program_request(self.epoch, self.plan, worker, addresses, self.transport))
            except grpc.aio.AioRpcError as err:
                raise ClusterError(f"installing epoch {self.epoch} on {worker}: {err.code().name}: "
                                   f"{err.details()}") from None
        await asyncio.gather(*[install(w) for w in self.plan.programs])
        for worker in self.plan.programs:
            self.drives[worker] = await self._open(worker, addresses[worker])
            self.readers.append(asyncio.create_task(self._read(worker, self.drives[worker])))

    async def _open(self, worker: str, address: str) -> _GrpcDrive | _TcpDrive:
        if self.transport == "grpc":
            call = self.stubs[worker].Drive()
            await call.write(worker_pb2.ValueBatch(epoch=self.epoch))
            return _GrpcDrive(call)
        try:
            port = (await self.stubs[worker].RelayEndpoint(worker_pb2.RelayEndpointRequest(), timeout=10)).port
            return _TcpDrive(await RelayConnection.open(address, port, Kind.HELLO_DRIVE, self.epoch,
                                                        self.max_message_bytes))
        except grpc.aio.AioRpcError as err:
            raise ClusterError(f"asking {worker} for its relay port: {err.code().name}: {err.details()}") from None
        except (OSError, asyncio.TimeoutError) as err:
            raise ClusterError(f"connecting to the relay port of {worker} ({address}): {err!r}") from None

    async def _read(self, worker: str, drive: _GrpcDrive | _TcpDrive) -> None:
        try:
            async for kind, reply in drive.replies():
                if reply.error_code and not reply.session:  # a relay connection broke: steps in flight are lost
                    message = f"worker {worker}: {reply.error_code}: {reply.error_message}"
                    if kind is Kind.ERROR:  # ... this one: the worker closes it
                        self._end(message)
                        return
                    self._fail_all(message)
                    continue
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
        except Exception as err:  # FrameError, a reset, an unreachable host...
            reason = f"broke its relay connection: {err!r}"
        self._end(f"worker {worker} {reason}")

    def _end(self, message: str) -> None:
        self.broken = self.broken or message
        for drive in self.drives.values():
            asyncio.ensure_future(drive.close())
        self._fail_all(message)

    def _fail_all(self, message: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ClusterError(message))
        self.pending.clear()

    async def step(self, session: str, position: int, x0: tensor_pb2.Tensor) -> tuple[tensor_pb2.Tensor, float]:
        """The final value, and the compute seconds on the step's critical path."""
        key = (session, position)
        if self.broken:
            raise ClusterError(f"epoch {self.epoch} can no longer run steps: {self.broken}")
        if key in self.pending:
            raise ClusterError(f"session {session} already has a step at position {position} in flight")
        future = self.pending[key] = asyncio.get_running_loop().create_future()
        batch = worker_pb2.ValueBatch(session=session, epoch=self.epoch, position=position,
                                      values=[tensor_pb2.NamedTensor(name="x0", tensor=x0)])
        try:
            for worker in self.plan.head_sends:
                await self.drives[worker].send(batch)
            values, path_compute = await asyncio.wait_for(future, self.step_timeout_seconds)
        except asyncio.TimeoutError:
            raise ClusterError(f"session {session}: no result within {self.step_timeout_seconds:.0f} s "
                               f"(position {position})") from None
        except grpc.aio.AioRpcError as err:
            raise ClusterError(f"session {session}: sending the step failed: {err.code().name}") from None
        except (ConnectionError, ValueError) as err:
            raise ClusterError(f"session {session}: sending the step failed: {err}") from None
        finally:
            self.pending.pop(key, None)
        return values[self.plan.final], path_compute

    async def close(self) -> None:
        for drive in self.drives.values():
            await drive.close()
        for task in self.readers:
            task.cancel()
        self._fail_all(f"epoch {self.epoch} closed")
