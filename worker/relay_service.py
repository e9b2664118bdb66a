"""The relay-mode RPCs of the Worker service (InstallProgram, RelayEndpoint, Drive,
Forward): a thin gRPC adapter over the worker's RelayEndpoint (relay_endpoint.py), as
the relay TCP port (relay_port.py) is for frames."""

from __future__ import annotations

import asyncio
import logging

import grpc

from edgeheads.v1 import worker_pb2
from edgeheads.worker.host import HostError, OpSpec, status_name
from edgeheads.worker.relay import ProgramCall
from edgeheads.worker.relay_port import RelayPort
from edgeheads.common.wire import WireError

log = logging.getLogger(__name__)


def program_from_proto(request: worker_pb2.InstallProgramRequest) -> list[ProgramCall]:
    """A call keeps the outputs it routes and those a later call of the program reads."""
    calls = list(request.calls)
    program = []
    for i, call in enumerate(calls):
        later = {n for c in calls[i + 1:] for n in c.inputs}
        routed = {n for r in call.routes for n in r.values}
        program.append(ProgramCall(
            ops=[OpSpec(op.block_id, list(op.inputs), op.output) for op in call.ops],
            inputs=list(call.inputs), keep=[op.output for op in call.ops if op.output in later | routed],
            routes={r.destination: list(r.values) for r in call.routes}))
    return program


class RelayRpcs:
    """Mixed into WorkerService; needs ``self.relay`` (the RelayEndpoint) and ``self.relay_port``
    (the RelayPort, or None until the daemon opens it)."""

    relay_port: RelayPort | None = None

    async def InstallProgram(self, request, context):
        try:
            self.relay.install(request.epoch, program_from_proto(request), dict(request.peers), request.transport)
        except HostError as err:
            await context.abort(grpc.StatusCode[err.code], str(err))
        return worker_pb2.InstallProgramReply(calls=len(request.calls))

    async def RelayEndpoint(self, request, context):
        if self.relay_port is None or not self.relay_port.port:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.relay.name} has no relay port open")
        return worker_pb2.RelayEndpointReply(port=self.relay_port.port)

    async def Drive(self, request_iterator, context):
        replies: asyncio.Queue = asyncio.Queue()
        sink = replies.put_nowait

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    if not batch.session:  # the opening message: this stream drives batch.epoch
                        self.relay.attach_drive(batch.epoch, sink)
                    else:
                        await self.relay.deliver(batch)
            except Exception as err:  # the head node went away; its sessions end with it
                log.info("worker %s: drive stream ended: %s", self.relay.name, err)
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            self.relay.detach_drive(sink)

    async def Forward(self, request_iterator, context):
        async for batch in request_iterator:
            err = await self.relay.deliver(batch)
            if isinstance(err, WireError):  # the stream itself is corrupt: drop it (the session is told)
                await context.abort(grpc.StatusCode[status_name(err)], str(err))
        return worker_pb2.ForwardReply()
