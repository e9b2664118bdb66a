"""The Worker gRPC servicer: a thin adapter from protos to BlockHost."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from edgeheads.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from edgeheads.worker import telemetry
from edgeheads.worker.host import BlockHost, HostError, OpSpec, status_name
from edgeheads.worker.links import LinkTable
from edgeheads.worker.migration_service import MigrationRpcs
from edgeheads.worker.relay_endpoint import RelayEndpoint
from edgeheads.worker.relay_service import RelayRpcs
from edgeheads.common.config import GrpcSettings
from edgeheads.common.wire import ChunkAssembler, WireError, tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)


async def abort_for(context: grpc.aio.ServicerContext, err: Exception) -> None:
    await context.abort(grpc.StatusCode[status_name(err)], str(err))


class WorkerService(RelayRpcs, MigrationRpcs, worker_pb2_grpc.WorkerServicer):
    def __init__(self, host: BlockHost, max_payload_bytes: int = 8 << 30,
                 grpc_settings: GrpcSettings | None = None, precopy_link_fraction: float = 0.9) -> None:
        self.host = host
        self.max_payload_bytes = max_payload_bytes
        self.grpc_settings = grpc_settings or GrpcSettings()
        self.metrics = None  # WorkerMetrics, set by the daemon
        self.links = LinkTable()
        self.relay = RelayEndpoint(host, self.grpc_settings)  # relay state; RelayRpcs and the RelayPort adapt it
        self.relay_port = None  # a RelayPort over self.relay, opened by the daemon
        self._init_migration(precopy_link_fraction)

    async def HasWeights(self, request, context):
        return worker_pb2.HasWeightsReply(present=self.host.has_weights(list(request.content_hashes)))

    async def LoadBlock(self, request_iterator: AsyncIterator[worker_pb2.LoadBlockChunk], context):
        header = None
        assembler = ChunkAssembler(self.max_payload_bytes)
        try:
            async for msg in request_iterator:
                if header is None:
                    header = msg
                    if not msg.block_id or not msg.content_hash or not msg.model_shape_json:
                        raise WireError("the first LoadBlock message must name block_id, content_hash "
                                        "and model_shape_json")
                if msg.HasField("chunk"):
                    assembler.add(msg.chunk)
            if header is None:
                raise WireError("empty LoadBlock stream")
            reused = header.content_hash in self.host.weights
            if not reused:
                if assembler.total is None:
                    raise HostError("NOT_FOUND", f"worker has no weights {header.content_hash[:12]} and none were sent")
                self.host.add_weights(assembler.finish(), header.content_hash)
            try:
                block = self.host.bind_block(header.block_id, header.model_shape_json, header.content_hash)
            except HostError:  # weights that came for a block refused are not kept (no block counts them)
                if not reused and header.content_hash not in self.host.block_hash.values():
                    self.host.weights.pop(header.content_hash, None)
                raise
        except (HostError, WireError) as err:
            await abort_for(context, err)
            return None
        return worker_pb2.LoadBlockReply(block_id=header.block_id, content_hash=header.content_hash,
                                         weight_bytes=block.weight_bytes, reused=reused)

    async def UnloadBlocks(self, request, context):
        try:
            return worker_pb2.UnloadBlocksReply(unloaded=self.host.unload(list(request.block_ids)))
        except HostError as err:
            await abort_for(context, err)

    async def RunCall(self, request_iterator, context):
        async for req in request_iterator:
            try:
                inputs = {nt.name: tensor_from_proto(nt.tensor, nt.name) for nt in req.inputs}
                ops = [OpSpec(op.block_id, list(op.inputs), op.output) for op in req.ops]
                t0 = time.perf_counter()
                outputs = self.host.run_call(req.session, req.position, inputs, ops, list(req.return_values),
                                             req.reserve_tokens)
                compute_seconds = time.perf_counter() - t0
            except (HostError, WireError) as err:
                log.warning("worker %s: rejected a call of session %s: %s", self.host.name, req.session, err)
                await abort_for(context, err)
                return
            yield worker_pb2.CallReply(outputs=[tensor_pb2.NamedTensor(name=k, tensor=tensor_to_proto(v))
                                                 for k, v in outputs.items()], compute_seconds=compute_seconds)

    async def DropSession(self, request, context):
        self.relay.drop_session(request.session)
        return worker_pb2.DropSessionReply(caches_dropped=self.host.end_session(request.session))

    async def Probe(self, request, context):
        return worker_pb2.ProbeReply(received=len(request.payload))

    async def SetMemoryLimit(self, request, context):
        self.host.memory_limit_bytes = request.memory_limit_bytes or None
        log.warning("worker %s: memory limit set to %s at runtime", self.host.name, self.host.memory_limit_bytes)
        return await self.GetTelemetry(request, context)

    async def GetTelemetry(self, request, context):
        ceiling = telemetry.memory_limit(self.host.memory_limit_bytes)
        used = self.host.memory_used_bytes()
        # available as in the controller's TelemetryReport: what blocks and caches may use in total
        # (the head node's admission budgets sessions with it)
        return worker_pb2.WorkerTelemetry(
            memory_limit_bytes=ceiling.bytes, memory_limit_source=ceiling.source, name=self.host.name,
            memory_available_bytes=telemetry.memory_capacity_bytes(self.host.memory_limit_bytes, used),
            memory_used_bytes=used, blocks=sorted(map(str, self.host.blocks)),
            sessions=len(self.host.sessions()),
            relay_frames_received=self.relay_port.frames_received if self.relay_port is not None else 0)
