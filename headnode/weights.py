"""Shipping block weights to workers, content-addressed.

The head node keeps each block's weights once, as tensors (ModelParts). What travels is
a block's safetensors blob (edgeheads.common.wire.weights_to_blob, the same bytes a
worker makes when it exports the block for a migration). A blob is made on demand,
streamed in chunks and dropped: only its content hash (sha256) and size are kept, so
the head node never holds a second, serialized copy of the model. Hashing serializes
every block once (one at a time, off the event loop); shipping serializes again only
the blocks a worker lacks.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass

import grpc
from tqdm import tqdm

from edgeheads.common.spec import BlockId
from edgeheads.common.wire import chunks, sha256_hex, weights_to_blob
from edgeheads.headnode.cluster_errors import CapacityError, ClusterError
from edgeheads.headnode.slicing import ModelParts
from edgeheads.v1 import worker_pb2, worker_pb2_grpc


@dataclass(frozen=True)
class Digest:
    content_hash: str  # sha256 of the block's blob: its content address on workers
    size_bytes: int  # the blob's length (for the progress bar)


class BlockWeights:
    def __init__(self, parts: ModelParts, chunk_bytes: int) -> None:
        self.parts = parts
        self.chunk_bytes = chunk_bytes
        self.shape_json = json.dumps(parts.shape.to_dict())
        self.digests: dict[BlockId, Digest] = {}

    def blob(self, block: BlockId) -> bytes:
        """A fresh serialization of ``block``; the caller drops it when sent."""
        return weights_to_blob(self.parts.blocks[block])

    def digest(self, block: BlockId) -> Digest:
        if block not in self.digests:
            data = self.blob(block)
            self.digests[block] = Digest(sha256_hex(data), len(data))
        return self.digests[block]

    def content_hash(self, block: BlockId) -> str:
        return self.digest(block).content_hash

    async def hash_all(self, blocks) -> None:
        """Hash the blocks not hashed yet, one blob at a time, in a worker thread."""
        missing = [b for b in blocks if b not in self.digests]
        if missing:
            await asyncio.to_thread(lambda: [self.digest(b) for b in missing])

    async def ship(self, placement: dict[BlockId, str], stubs: dict[str, worker_pb2_grpc.WorkerStub],
                   progress: bool = True, load_timeout_seconds: float | None = None) -> int:
        """Bind every block of ``placement`` on its worker, sending the weights a worker
        lacks (by content hash). Workers in parallel, each worker's blocks one by one, so
        at most one blob per worker exists at a time. Returns the bytes of weights sent.
        ``load_timeout_seconds`` bounds each block's LoadBlock call (None: no bound)."""
        await self.hash_all(placement)
        by_worker: dict[str, list[BlockId]] = {}
        for block, worker in sorted(placement.items()):
            by_worker.setdefault(worker, []).append(block)
        todo: dict[str, list[tuple[BlockId, bool]]] = {}
        for worker, blocks in by_worker.items():
            hashes = [self.content_hash(b) for b in blocks]
            try:
                reply = await stubs[worker].HasWeights(worker_pb2.HasWeightsRequest(content_hashes=hashes), timeout=30)
            except grpc.aio.AioRpcError as err:
                raise ClusterError(f"asking {worker} for its weights: {err.code().name}: {err.details()}") from None
            present = set(reply.present)
            todo[worker] = [(b, self.content_hash(b) in present) for b in blocks]
        total = sum(self.digests[b].size_bytes for items in todo.values() for b, have in items if not have)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="distributing weights", disable=not progress,
                   file=sys.stderr)

        async def load_all(worker: str) -> None:
            for block, have in todo[worker]:
                await self._load(stubs[worker], worker, block, have, bar, load_timeout_seconds)
        try:
            await asyncio.gather(*[load_all(w) for w in todo])
        finally:
            bar.close()
        return total

    async def _load(self, stub: worker_pb2_grpc.WorkerStub, worker: str, block: BlockId, have: bool,
                    bar: tqdm, timeout_seconds: float | None = None) -> None:
        header = dict(block_id=str(block), model_shape_json=self.shape_json, content_hash=self.content_hash(block))
        data = None if have else await asyncio.to_thread(self.blob, block)

        async def messages():
            if data is None:  # the worker holds these weights: bind them only
                yield worker_pb2.LoadBlockChunk(**header)
                return
            for i, chunk in enumerate(chunks(data, self.chunk_bytes)):
                yield worker_pb2.LoadBlockChunk(**header, chunk=chunk) if i == 0 else \
                    worker_pb2.LoadBlockChunk(chunk=chunk)
                bar.update(len(chunk.data))
        try:
            await (stub.LoadBlock(messages()) if timeout_seconds is None else
                   stub.LoadBlock(messages(), timeout=timeout_seconds))
        except grpc.aio.AioRpcError as err:
            kind = CapacityError if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED else ClusterError
            raise kind(f"loading {block} on {worker}: {err.code().name}: {err.details()}") from None
