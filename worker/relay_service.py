"""The relay-mode RPCs of the Worker service (InstallProgram, Drive, Forward): thin
adapters between protos, the RelayExecutor and the peer links."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from edgeheads.v1 import tensor_pb2, worker_pb2
from edgeheads.worker.host import HostError, StageOpSpec, status_name
from edgeheads.worker.peers import PeerLinks
from edgeheads.worker.relay import ProgramCall, RelayExecutor
from edgeheads.common.config import GrpcSettings
from edgeheads.common.wire import WireError, fill_tensor_proto, tensor_from_proto

log = logging.getLogger(__name__)


def program_from_proto(request: worker_pb2.InstallProgramRequest) -> list[ProgramCall]:
    """A call keeps the outputs it routes and those a later call of the program reads."""
    calls = list(request.calls)
    program = []
    for i, call in enumerate(calls):
        later = {n for c in calls[i + 1:] for n in c.inputs}
        routed = {n for r in call.routes for n in r.values}
        program.append(ProgramCall(
            ops=[StageOpSpec(op.block_id, list(op.inputs), op.output) for op in call.ops],
            inputs=list(call.inputs), keep=[op.output for op in call.ops if op.output in later | routed],
            routes={r.destination: list(r.values) for r in call.routes}))
    return program


class RelayRpcs:
    """Mixed into WorkerService; needs ``self.host``."""

    def _init_relay(self, grpc_settings: GrpcSettings) -> None:
        self.relay = RelayExecutor(self.host)
        self.peers = PeerLinks(grpc_settings, lambda batch, message: self._report(batch, "UNAVAILABLE", message))
        # epoch -> where replies for the head node go: its Drive stream or its relay TCP connection
        self.drives: dict[int, Callable[[worker_pb2.DriveReply], None]] = {}
        self.relay_port = None  # a RelayPort, started by the daemon

    async def InstallProgram(self, request, context):
        if request.transport not in ("", "grpc", "tcp"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown relay transport {request.transport!r} (tcp or grpc)")
        try:
            self.relay.install(request.epoch, program_from_proto(request))
        except HostError as err:
            await context.abort(grpc.StatusCode[err.code], str(err))
        self.peers.update(dict(request.peers), request.transport or "grpc")
        return worker_pb2.InstallProgramReply(calls=len(request.calls))

    async def RelayEndpoint(self, request, context):
        if self.relay_port is None or not self.relay_port.port:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.host.name} has no relay port open")
        return worker_pb2.RelayEndpointReply(port=self.relay_port.port)

    async def Drive(self, request_iterator, context):
        replies: asyncio.Queue = asyncio.Queue()
        sink = replies.put_nowait

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    if not batch.session:  # the opening message: this stream drives batch.epoch
                        self.drives[batch.epoch] = sink
                    else:
                        await self._deliver(batch)
            except Exception as err:  # the head node went away; its sessions end with it
                log.info("worker %s: drive stream ended: %s", self.host.name, err)
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for epoch in [e for e, s in self.drives.items() if s is sink]:
                del self.drives[epoch]

    async def Forward(self, request_iterator, context):
        async for batch in request_iterator:
            err = await self._deliver(batch)
            if isinstance(err, WireError):  # the stream itself is corrupt: drop it (the session is told)
                await context.abort(grpc.StatusCode[status_name(err)], str(err))
        return worker_pb2.ForwardReply()

    # ------------------------------------------------------------------ helpers
    async def _deliver(self, batch: worker_pb2.ValueBatch) -> Exception | None:
        """Run what the batch makes ready and send the results on. A failure is reported to
        the head node (it ends that session only) and returned."""
        try:
            values = {nt.name: tensor_from_proto(nt.tensor, nt.name) for nt in batch.values}
            for out, path in self.relay.deliver(batch.session, batch.epoch, batch.position, values,
                                                batch.path_compute_seconds):
                made: dict[str, tensor_pb2.NamedTensor] = {}  # a value sent to two places is encoded once
                for dest, tensors in out:
                    # the same fields either way: a ValueBatch to a peer, a DriveReply to the head node
                    kind = worker_pb2.ValueBatch if dest else worker_pb2.DriveReply
                    message = kind(session=batch.session, epoch=batch.epoch, position=batch.position,
                                   path_compute_seconds=path)
                    for n, t in tensors.items():
                        nt = message.values.add(name=n)
                        if n in made:
                            nt.CopyFrom(made[n])
                        else:
                            fill_tensor_proto(nt.tensor, t)
                            made[n] = nt
                    if dest:
                        self.peers.send(dest, message)
                    else:
                        self._to_head(batch.epoch, message)
                if self.peers.transport != "tcp":  # tcp writes go out at once; a gRPC send needs its pump
                    await asyncio.sleep(0)  # to run before computing on
        except (HostError, WireError) as err:
            log.warning("worker %s: relay step of session %s failed: %s", self.host.name, batch.session, err)
            self._report(batch, status_name(err), str(err))
            return err
        return None

    def _report(self, batch: worker_pb2.ValueBatch, code: str, message: str) -> None:
        self._to_head(batch.epoch, worker_pb2.DriveReply(
            session=batch.session, epoch=batch.epoch, position=batch.position, error_code=code,
            error_message=f"worker {self.host.name}: {message}"))

    def _to_head(self, epoch: int, reply: worker_pb2.DriveReply) -> None:
        sink = self.drives.get(epoch)
        if sink is None:
            log.warning("worker %s: no head node drives epoch %d; dropped a reply for session %s",
                        self.host.name, epoch, reply.session)
            return
        sink(reply)
