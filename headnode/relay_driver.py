"""The head node's side of relay mode: install each worker's program for an epoch,
keep one Drive stream per worker, start steps and wait for the final value.

Per step the head node sends ``x0`` to the workers that read it and then only waits:
the activations go from worker to worker, and the worker holding the last block
sends the final value back on its Drive stream. An error anywhere comes back the same
way, naming the worker, and fails only that session's step. With the ``tcp`` relay
transport (the default) a Drive stream is a TCP connection to the worker's relay port,
carrying the same messages in frames. Both kinds of drive are links of
edgeheads.common.relay_transport, the same ones the workers use between themselves.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from edgeheads.headnode.cluster_errors import ClusterError, cancelled_here
from edgeheads.headnode.relay_plan import RelayPlan
from edgeheads.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from edgeheads.common.relay_transport import TRANSPORTS, LinkError, RelayLink, Role, connect

log = logging.getLogger(__name__)

INSTALL_TIMEOUT_SECONDS = 30.0  # installing a program is quick; a hung worker must not hold a step for ever


def program_request(epoch: int, plan: RelayPlan, worker: str, addresses: dict[str, str],
                    transport: str = "tcp") -> worker_pb2.InstallProgramRequest:
    calls = [worker_pb2.ProgramCall(
        ops=[worker_pb2.BlockOp(block_id=str(op.block), inputs=list(op.inputs), output=op.output) for op in c.ops],
        inputs=list(c.inputs), routes=[worker_pb2.Route(destination=d, values=list(v)) for d, v in c.routes])
        for c in plan.programs[worker]]
    peers = {d: addresses[d] for c in plan.programs[worker] for d, _ in c.routes if d}
    return worker_pb2.InstallProgramRequest(epoch=epoch, calls=calls, peers=peers, transport=transport)


class RelayDriver:
    def __init__(self, epoch: int, plan: RelayPlan, stubs: dict[str, worker_pb2_grpc.WorkerStub],
                 step_timeout_seconds: float, transport: str = "tcp", max_message_bytes: int = 64 << 20) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"relay transport must be 'tcp' or 'grpc', not {transport!r}")
        self.epoch = epoch
        self.plan = plan
        self.stubs = stubs
        self.step_timeout_seconds = step_timeout_seconds
        self.transport = transport
        self.max_message_bytes = max_message_bytes
        self.links: dict[str, RelayLink] = {}  # worker -> its drive
        self.readers: list[asyncio.Task] = []
        self.pending: dict[tuple[str, int], asyncio.Future] = {}
        self.broken = ""  # why a drive ended: every later step of this epoch fails at once

    async def start(self, addresses: dict[str, str]) -> None:
        """Install every program, then open the drives."""
        async def install(worker: str) -> None:
            try:
                await self.stubs[worker].InstallProgram(
                    program_request(self.epoch, self.plan, worker, addresses, self.transport),
                    timeout=INSTALL_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as err:
                raise ClusterError(f"installing epoch {self.epoch} on {worker}: {err.code().name}: "
                                   f"{err.details()}") from None
            except asyncio.CancelledError:
                if cancelled_here():
                    raise
                raise ClusterError(f"installing epoch {self.epoch} on {worker}: the call was cancelled "
                                   "(its channel was closed)") from None
        await asyncio.gather(*[install(w) for w in self.plan.programs])
        for worker in self.plan.programs:
            self.links[worker] = await self._open(worker, addresses[worker])
            self.readers.append(asyncio.create_task(self._read(worker, self.links[worker])))

    async def _open(self, worker: str, address: str) -> RelayLink:
        link = connect(self.transport, Role.DRIVE, address, self.epoch, self.max_message_bytes,
                       stub=self.stubs[worker])
        try:
            await link.opened()
        except LinkError as err:
            link.close()
            raise ClusterError(f"opening the relay drive to {worker} ({address}): {err}") from None
        return link

    async def _read(self, worker: str, link: RelayLink) -> None:
        try:
            async for reply in link.replies():
                if reply.error_code and not reply.session:  # a relay link broke: steps in flight are lost
                    self._fail_all(f"worker {worker}: {reply.error_code}: {reply.error_message}")
                    continue
                future = self.pending.pop((reply.session, reply.position), None)
                if future is None or future.done():
                    continue
                if reply.error_code:
                    future.set_exception(error_from_reply(reply.error_code, reply.error_message))
                else:
                    future.set_result(({nt.name: nt.tensor for nt in reply.values}, reply.path_compute_seconds))
            reason = f"worker {worker} closed its relay drive"
        except asyncio.CancelledError:
            if cancelled_here():  # close()
                return
            reason = f"worker {worker}: its relay drive was cancelled (its channel was closed)"
        except LinkError as err:  # a reset, a broken frame, an ERROR frame before the worker closes it...
            reason = f"worker {worker}: {err}"
        except Exception as err:  # a bug: still fail fast
            reason = f"worker {worker} broke its relay drive: {err!r}"
        self._end(reason)

    def _end(self, message: str) -> None:
        self.broken = self.broken or message
        for link in self.links.values():
            link.close()
        self._fail_all(message)

    def _fail_all(self, message: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ClusterError(message))
        self.pending.clear()

    async def step(self, session: str, position: int, x0: tensor_pb2.Tensor,
                   reserve_tokens: int = 0) -> tuple[tensor_pb2.Tensor, float]:
        """The final value, and the compute seconds on the step's critical path."""
        key = (session, position)
        if self.broken:
            raise ClusterError(f"epoch {self.epoch} can no longer run steps: {self.broken}")
        if key in self.pending:
            raise ClusterError(f"session {session} already has a step at position {position} in flight")
        future = self.pending[key] = asyncio.get_running_loop().create_future()
        batch = worker_pb2.ValueBatch(session=session, epoch=self.epoch, position=position,
                                      reserve_tokens=reserve_tokens,
                                      values=[tensor_pb2.NamedTensor(name="x0", tensor=x0)])
        try:
            for worker in self.plan.head_sends:
                self.links[worker].send(batch)
            values, path_compute = await asyncio.wait_for(future, self.step_timeout_seconds)
        except asyncio.TimeoutError:
            raise ClusterError(f"session {session}: no result within {self.step_timeout_seconds:.0f} s "
                               f"(position {position})") from None
        except (ConnectionError, ValueError) as err:
            raise ClusterError(f"session {session}: sending the step failed: {err}") from None
        finally:
            self.pending.pop(key, None)
        return values[self.plan.final], path_compute

    async def close(self) -> None:
        for link in self.links.values():
            link.close()
        for task in self.readers:
            task.cancel()
        self._fail_all(f"epoch {self.epoch} closed")


def error_from_reply(code: str, message: str) -> ClusterError:
    """The error a worker answered one step with, keeping its status (RESOURCE_EXHAUSTED from
    its cache guard, FAILED_PRECONDITION for a session it dropped) rather than UNAVAILABLE. Not
    a CapacityError: that one marks the whole cluster down when a recovery meets it."""
    return ClusterError(f"{code}: {message}", code=code if code in grpc.StatusCode.__members__ else None)
