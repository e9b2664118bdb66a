"""The migration RPCs of the Worker service: ExportBlockState(s) on the source, PullBlock(s)
on the destination. Thin adapters over worker/migration.py.

A pull of several blocks from one source is one call there (ExportBlockStates): a source
runs its decode steps on the same event loop that serves the export, so on a board left a
tenth of a core every call and every chunk waits for a step (a few hundred ms) before it goes.
One call per block made moving 150 blocks off such a board take 80 s (docs/testbed.md)."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.worker.host import HostError, status_name
from edgeheads.worker.migration import cache_lengths, export_state, import_state
from edgeheads.worker.pacing import delay_seconds, paced_chunk_bytes, paced_rate
from edgeheads.common.channels import open_channel
from edgeheads.common.wire import ChunkAssembler, DataLossError, WireError, chunks

log = logging.getLogger(__name__)

LINK_SAMPLE_BYTES = 1 << 20  # a payload this big, unpaced, is a sample of the link's bandwidth

MAX_PULL_BLOCKS = 4096  # blocks per PullBlocks / ExportBlockStates call


def transfer_limit(seconds: float) -> float | None:
    """A request's timeout_seconds as a limit: none for 0, a negative, a non-finite or an absurd value."""
    return seconds if math.isfinite(seconds) and 0 < seconds < 1e7 else None


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

    # ------------------------------------------------------------------ the source
    async def _export(self, blocks, rate: float):
        """The payloads of ``blocks`` (ExportBlockStateRequests) as one chunk stream, paced to
        ``rate`` bytes/s overall (0: unpaced). Each block is exported when its turn comes, so its
        cache rows are as recent as they can be. HostError for a block that cannot be exported."""
        size = paced_chunk_bytes(rate, self.grpc_settings.chunk_bytes)
        start, sent = time.perf_counter(), 0
        for block in blocks:
            blob = export_state(self.host, block.block_id, block.include_weights, dict(block.from_positions))
            for chunk in chunks(blob, size):
                wait = delay_seconds(sent, time.perf_counter() - start, rate)
                if wait > 0:
                    await asyncio.sleep(wait)
                yield chunk
                sent += len(chunk.data)

    async def _export_or_abort(self, blocks, rate: float, context):
        """``_export``, with a block that cannot be exported ending the call with its status."""
        rate = rate if rate > 0 else 0.0
        try:
            async for chunk in self._export(blocks, rate):
                yield chunk
        except HostError as err:
            await context.abort(grpc.StatusCode[err.code], str(err))

    async def ExportBlockState(self, request, context):
        async for chunk in self._export_or_abort([request], request.max_bytes_per_second, context):
            yield chunk

    async def ExportBlockStates(self, request, context):
        if not request.blocks or len(request.blocks) > MAX_PULL_BLOCKS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ExportBlockStates takes 1 to {MAX_PULL_BLOCKS} "
                                f"blocks, not {len(request.blocks)}")
        async for chunk in self._export_or_abort(request.blocks, request.max_bytes_per_second, context):
            yield chunk

    # ------------------------------------------------------------------ the destination
    async def PullBlock(self, request, context):
        if not request.block_id or not request.source_address or not request.content_hash:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PullBlock needs block_id, source_address "
                                "and content_hash")
        items = [worker_pb2.PullItem(block_id=request.block_id, content_hash=request.content_hash)]
        [reply] = await self._pull(request.source_address, request.model_shape_json, items, request.delta,
                                   request.timeout_seconds, context)
        return reply

    async def PullBlocks(self, request, context):
        items = list(request.blocks)
        if not request.source_address or not items or len(items) > MAX_PULL_BLOCKS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"PullBlocks needs a source_address and 1 to "
                                f"{MAX_PULL_BLOCKS} blocks ({len(items)} given)")
        missing = [i for i, item in enumerate(items) if not item.block_id or not item.content_hash]
        if missing:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"PullBlocks: block {missing[0]} lacks a block_id "
                                "or a content_hash")
        if len({item.block_id for item in items}) != len(items):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PullBlocks names a block twice")
        replies = await self._pull(request.source_address, request.model_shape_json, items, request.delta,
                                   request.timeout_seconds, context)
        return worker_pb2.PullBlocksReply(blocks=replies)

    async def _pull(self, source: str, shape_json: str, items, delta: bool, timeout_seconds: float,
                    context) -> list[worker_pb2.PullBlockReply]:
        """Pull ``items`` (PullItems) from ``source`` in one ExportBlockStates stream and import
        each block's payload as it completes; ``timeout_seconds`` bounds each payload."""
        exports = []
        for item in items:
            try:
                from_positions = cache_lengths(self.host, item.block_id) if delta else {}
            except HostError as err:  # not a block id
                await context.abort(grpc.StatusCode[err.code], f"pulling {item.block_id}: {err}")
            exports.append(worker_pb2.ExportBlockStateRequest(
                block_id=item.block_id, include_weights=item.content_hash not in self.host.weights,
                from_positions=from_positions))
        link = self.links.links.get(source)
        rate = 0.0 if delta else paced_rate(self.precopy_link_fraction,
                                              link.bandwidth_bytes_per_second if link else None)
        limit = transfer_limit(timeout_seconds)
        replies: list[worker_pb2.PullBlockReply] = []
        start = begun = time.perf_counter()
        current = items[0].block_id
        # no deadline on the whole call: each payload is bounded below, however long the imports take
        stream = self._source(source).ExportBlockStates(
            worker_pb2.ExportBlockStatesRequest(blocks=exports, max_bytes_per_second=rate))
        try:
            chunk_iter = stream.__aiter__()
            assembler, first_chunk = ChunkAssembler(self.max_payload_bytes), None
            while len(replies) < len(items):
                item = items[len(replies)]
                current = item.block_id
                left = None if limit is None else limit - (time.perf_counter() - begun)
                try:
                    chunk = await asyncio.wait_for(chunk_iter.__anext__(), left)
                except StopAsyncIteration:
                    raise DataLossError(f"the source's stream ended after {len(replies)} of {len(items)} "
                                        "blocks") from None
                first_chunk = first_chunk or time.perf_counter()
                assembler.add(chunk)
                if not assembler.done:
                    continue
                blob = assembler.finish()
                received = time.perf_counter()
                # big enough to say something about the link (a paced one is not): its own chunks only,
                # not the source's export of it nor our import. Only the stream's first payload: while we
                # import one, gRPC buffers the next, whose chunks then read at memory speed (that read
                # once as a 1 Gbit/s link carrying 760 GB/s)
                if not replies and len(blob) >= LINK_SAMPLE_BYTES and not rate and received > first_chunk:
                    self.links.record(source, len(blob) / (received - first_chunk), None, "transfer")
                meta = import_state(self.host, blob, item.block_id, shape_json, item.content_hash)
                now = time.perf_counter()
                if self.metrics is not None:
                    self.metrics.pulled_bytes.inc(len(blob))
                rows = sum(stop - first for first, stop in meta["rows"].values())
                replies.append(worker_pb2.PullBlockReply(
                    block_id=item.block_id, bytes=len(blob), weights_sent=meta["weights"], sessions=len(meta["rows"]),
                    rows=rows, seconds=now - begun))
                begun, assembler, first_chunk = now, ChunkAssembler(self.max_payload_bytes), None
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"pulling {current} from {source}: no payload "
                                f"within {limit:g} s")
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                self._drop_source(source)  # a new channel for the next pull
            code = err.code() if err.code() != grpc.StatusCode.CANCELLED else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"pulling {current} from {source}: {err.code().name}: {err.details()}")
        except (HostError, WireError) as err:
            await context.abort(grpc.StatusCode[status_name(err)], f"pulling {current}: {err}")
        finally:
            stream.cancel()  # a no-op when the stream ended; otherwise the source stops exporting
        seconds = time.perf_counter() - start
        total = sum(r.bytes for r in replies)
        log.info("worker %s: pulled %d blocks from %s: %d bytes, %d cache rows%s, %.3f s", self.host.name,
                 len(replies), source, total, sum(r.rows for r in replies),
                 f", {sum(r.weights_sent for r in replies)} with weights" if any(r.weights_sent for r in replies)
                 else "", seconds)
        return replies
