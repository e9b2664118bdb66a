"""The migration RPCs of the Worker service: ExportBlockState on the source, PullBlock
on the destination. Thin adapters over worker/migration.py."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.worker.host import HostError, status_name
from edgeheads.worker.migration import cache_lengths, export_state, import_state
from edgeheads.common.channels import open_channel
from edgeheads.common.wire import ChunkAssembler, WireError, chunks

log = logging.getLogger(__name__)


class MigrationRpcs:
    """Mixed into WorkerService; needs ``self.host``, ``self.grpc_settings``,
    ``self.max_payload_bytes`` and ``self.links``."""

    def _init_migration(self) -> None:
        self._sources: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]] = {}

    def _source(self, address: str) -> worker_pb2_grpc.WorkerStub:
        """One channel per source, kept: a warm TCP connection (no handshake, no slow start)
        for every block after the first."""
        if address not in self._sources:
            channel = open_channel(address, self.grpc_settings)  # the process's TLS and token
            self._sources[address] = (channel, worker_pb2_grpc.WorkerStub(channel))
        return self._sources[address][1]

    def _drop_source(self, address: str) -> None:
        entry = self._sources.pop(address, None)
        if entry is not None:
            asyncio.ensure_future(entry[0].close())

    async def ExportBlockState(self, request, context):
        try:
            blob = export_state(self.host, request.block_id, request.include_weights, dict(request.from_positions))
        except HostError as err:
            await context.abort(grpc.StatusCode[err.code], str(err))
        for chunk in chunks(blob, self.grpc_settings.chunk_bytes):
            yield chunk

    async def PullBlock(self, request, context):
        if not request.block_id or not request.source_address or not request.content_hash:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PullBlock needs block_id, source_address "
                                "and content_hash")
        include_weights = request.content_hash not in self.host.weights
        try:
            from_positions = cache_lengths(self.host, request.block_id) if request.delta else {}
        except HostError as err:  # not a block id
            await context.abort(grpc.StatusCode[err.code], f"pulling {request.block_id}: {err}")
        export = worker_pb2.ExportBlockStateRequest(block_id=request.block_id, include_weights=include_weights,
                                                    from_positions=from_positions)
        assembler = ChunkAssembler(self.max_payload_bytes)
        start = time.perf_counter()
        try:
            async for chunk in self._source(request.source_address).ExportBlockState(
                    export, timeout=request.timeout_seconds or None):
                assembler.add(chunk)
            blob = assembler.finish()
            meta = import_state(self.host, blob, request.block_id, request.model_shape_json, request.content_hash)
        except grpc.aio.AioRpcError as err:
            self._drop_source(request.source_address)
            code = err.code() if err.code() != grpc.StatusCode.CANCELLED else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"pulling {request.block_id} from {request.source_address}: "
                                f"{err.code().name}: {err.details()}")
        except (HostError, WireError) as err:
            await context.abort(grpc.StatusCode[status_name(err)], f"pulling {request.block_id}: {err}")
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.pulled_bytes.inc(len(blob))
        if len(blob) >= 1 << 20:  # big enough to say something about the link
            self.links.record(request.source_address, len(blob) / seconds, None, "transfer")
        rows = sum(stop - begin for begin, stop in meta["rows"].values())
        log.info("worker %s: pulled %s from %s: %d bytes, %d cache rows over %d sessions%s, %.3f s",
                 self.host.name, request.block_id, request.source_address, len(blob), rows, len(meta["rows"]),
                 " with weights" if meta["weights"] else "", seconds)
        return worker_pb2.PullBlockReply(block_id=request.block_id, bytes=len(blob), weights_sent=meta["weights"],
                                         sessions=len(meta["rows"]), rows=rows, seconds=seconds)
