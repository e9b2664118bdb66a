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
from edgeheads.worker.pacing import PACED_CHUNK_BYTES, delay_seconds, paced_rate
from edgeheads.common.channels import open_channel
from edgeheads.common.wire import ChunkAssembler, WireError, chunks

log = logging.getLogger(__name__)


class MigrationRpcs:
    """Mixed into WorkerService; needs ``self.host``, ``self.grpc_settings``,
    ``self.max_payload_bytes`` and ``self.links``."""

    def _init_migration(self, precopy_link_fraction: float = 0.9) -> None:
        self._sources: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]] = {}
        self.precopy_link_fraction = precopy_link_fraction  # worker.precopy_link_fraction

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
        rate = request.max_bytes_per_second if request.max_bytes_per_second > 0 else 0.0
        size = min(self.grpc_settings.chunk_bytes, PACED_CHUNK_BYTES) if rate else self.grpc_settings.chunk_bytes
        start, sent = time.perf_counter(), 0
        for chunk in chunks(blob, size):
            wait = delay_seconds(sent, time.perf_counter() - start, rate)
            if wait > 0:
                await asyncio.sleep(wait)
            yield chunk
            sent += len(chunk.data)

    async def PullBlock(self, request, context):
        if not request.block_id or not request.source_address or not request.content_hash:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PullBlock needs block_id, source_address "
                                "and content_hash")
        include_weights = request.content_hash not in self.host.weights
        try:
            from_positions = cache_lengths(self.host, request.block_id) if request.delta else {}
        except HostError as err:  # not a block id
            await context.abort(grpc.StatusCode[err.code], f"pulling {request.block_id}: {err}")
        link = self.links.links.get(request.source_address)
        rate = 0.0 if request.delta else paced_rate(self.precopy_link_fraction,
                                                      link.bandwidth_bytes_per_second if link else None)
        export = worker_pb2.ExportBlockStateRequest(block_id=request.block_id, include_weights=include_weights,
                                                    from_positions=from_positions, max_bytes_per_second=rate)
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
        if len(blob) >= 1 << 20 and not rate:  # big enough to say something about the link (a paced one is not)
            self.links.record(request.source_address, len(blob) / seconds, None, "transfer")
        rows = sum(stop - begin for begin, stop in meta["rows"].values())
        log.info("worker %s: pulled %s from %s: %d bytes, %d cache rows over %d sessions%s, %.3f s",
                 self.host.name, request.block_id, request.source_address, len(blob), rows, len(meta["rows"]),
                 " with weights" if meta["weights"] else "", seconds)
        return worker_pb2.PullBlockReply(block_id=request.block_id, bytes=len(blob), weights_sent=meta["weights"],
                                         sessions=len(meta["rows"]), rows=rows, seconds=seconds)
