"""Weight shipping keeps no serialized copy of the model: blobs are made on demand,
streamed in chunks and dropped; only each block's content hash stays."""

from __future__ import annotations

import asyncio
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeheads.common.wire import sha256_hex, weights_to_blob
from edgeheads.controller.spread import WorkerCapacity, spread
from edgeheads.headnode.cluster_errors import ClusterError
from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.headnode.weights import BlockWeights
from edgeheads.v1 import worker_pb2
from tiny_configs import TINY_CONFIGS


def large_bytes_held(root: object, limit: int = 1024) -> list[int]:
    """Sizes of bytes-like objects over ``limit`` reachable from ``root`` through the
    project's own objects and plain containers (not through tensors or gRPC objects)."""
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (bytes, bytearray, memoryview)):
            if len(obj) > limit:
                found.append(len(obj))
        elif isinstance(obj, (torch.Tensor, type, types.ModuleType)):
            continue
        elif isinstance(obj, dict):
            stack += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif type(obj).__module__.startswith("edgeheads") and hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return found


class FakeWorker:
    """HasWeights and LoadBlock as a worker answers them, keeping what arrived."""

    def __init__(self, present: set[str] = frozenset()) -> None:
        self.present = set(present)
        self.loaded: dict[str, tuple[str, bytes | None]] = {}  # block -> (hash, bytes received or None)

    async def HasWeights(self, request, timeout=None):
        return worker_pb2.HasWeightsReply(present=[h for h in request.content_hashes if h in self.present])

    async def LoadBlock(self, messages):
        header, chunks = None, []
        async for message in messages:
            header = header or message
            chunks += [message.chunk] if message.HasField("chunk") else []
        data = b"".join(c.data for c in chunks)
        offsets = [sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]
        assert [c.offset for c in chunks] == offsets
        assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True] * bool(chunks)
        assert [c.sha256 for c in chunks[-1:]] == [sha256_hex(data)] * bool(chunks)
        self.loaded[header.block_id] = (header.content_hash, data or None)
        if data:
            self.present.add(header.content_hash)
        return worker_pb2.LoadBlockReply(block_id=header.block_id)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


def test_blocks_are_streamed_exactly_and_only_their_hashes_are_kept(parts):
    weights = BlockWeights(parts, chunk_bytes=1000)  # several chunks per block
    placement = spread(parts.shape, [WorkerCapacity(f"w{i}", 1 << 40) for i in range(3)], 256)
    first = next(iter(sorted(placement)))
    already = sha256_hex(weights_to_blob(parts.blocks[first]))
    stubs = {"w0": FakeWorker(), "w1": FakeWorker(), "w2": FakeWorker()}
    stubs[placement[first]].present.add(already)
    asyncio.run(weights.ship(placement, stubs, progress=False))
    for block, worker in placement.items():
        content_hash, data = stubs[worker].loaded[str(block)]
        blob = weights_to_blob(parts.blocks[block])
        assert content_hash == sha256_hex(blob) == weights.content_hash(block)
        assert data == (None if block == first else blob)  # a worker holding the hash gets no bytes
    assert set(weights.digests) == set(placement)
    assert large_bytes_held(weights) == []
    assert max(len(weights_to_blob(b)) for b in parts.blocks.values()) > 1024  # the check above could fail

    # placed again on workers that hold everything: nothing is serialized for sending
    made = []
    weights.blob = lambda block: made.append(block) or weights_to_blob(parts.blocks[block])
    asyncio.run(weights.ship(placement, stubs, progress=False))
    assert made == []


def test_a_worker_refusing_a_block_is_a_cluster_error(parts):
    class Refusing(FakeWorker):
        async def LoadBlock(self, messages):
            import grpc
            raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), details="no memory left")

    placement = dict.fromkeys(parts.blocks, "w0")
    with pytest.raises(ClusterError, match="on w0: RESOURCE_EXHAUSTED: no memory left"):
        asyncio.run(BlockWeights(parts, 1 << 20).ship(placement, {"w0": Refusing()}, progress=False))
