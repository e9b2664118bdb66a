"""PullBlocks (worker/migration_service.py): a destination pulls several blocks from one source
in one ExportBlockStates stream, between two real gRPC worker servers. The caches arrive
equal to the source's, the source serves one call for all of them, and a bad request, an
unknown block or a stream cut short gets a clear status while both workers keep serving."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeheads.common.wire import sha256_hex, weights_to_blob
from edgeheads.headnode.migrate import Move, precopy_caches, pull_batches
from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.worker import migration_service
from edgeheads.worker.host import BlockHost, OpSpec
from edgeheads.worker.migration import cache_lengths
from edgeheads.worker.pacing import PACED_CHUNK_BYTES, paced_chunk_bytes
from edgeheads.worker.service import WorkerService
from tiny_configs import TINY_CONFIGS

BLOCKS = ["attn(0,0)", "attn(0,1)", "attn(1,0)", "ffn(1)", "proj(0)"]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


def hashes(parts) -> dict[str, str]:
    return {str(b): sha256_hex(weights_to_blob(w)) for b, w in parts.blocks.items() if str(b) in BLOCKS}


def source_host(parts) -> BlockHost:
    host = BlockHost("src")
    shape_json = json.dumps(parts.shape.to_dict())
    for block_id, weights in parts.blocks.items():
        if str(block_id) in BLOCKS:
            blob = weights_to_blob(weights)
            host.add_weights(blob, sha256_hex(blob))
            host.bind_block(str(block_id), shape_json, sha256_hex(blob))
    torch.manual_seed(1)
    for session, n in [("a", 6), ("b", 3)]:
        for block in BLOCKS:
            if block.startswith("attn"):
                host.run_call(session, 0, {"x": torch.randn(1, n, parts.shape.hidden_size)},
                              [OpSpec(block, ["x"], "y")], ["y"])
    return host


class CountingService(WorkerService):
    def __init__(self, host: BlockHost) -> None:
        super().__init__(host)
        self.calls: list[str] = []

    async def ExportBlockState(self, request, context):
        self.calls.append("ExportBlockState")
        async for chunk in super().ExportBlockState(request, context):
            yield chunk

    async def ExportBlockStates(self, request, context):
        self.calls.append("ExportBlockStates")
        async for chunk in super().ExportBlockStates(request, context):
            yield chunk


class CutShort(WorkerService):
    """A source whose stream ends after the first block's payload."""

    async def ExportBlockStates(self, request, context):
        async for chunk in super().ExportBlockStates(request, context):
            yield chunk
            if chunk.last:
                return


async def serve(service: WorkerService) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def pull_request(parts, source: str, blocks: list[str], delta: bool = False) -> worker_pb2.PullBlocksRequest:
    content = hashes(parts)
    return worker_pb2.PullBlocksRequest(
        source_address=source, model_shape_json=json.dumps(parts.shape.to_dict()), delta=delta, timeout_seconds=30,
        blocks=[worker_pb2.PullItem(block_id=b, content_hash=content.get(b, "0" * 64)) for b in blocks])


def run_pair(parts, source_service: WorkerService, body, destination: WorkerService | None = None):
    async def main():
        dst_service = destination or WorkerService(BlockHost("dst"))
        dst_host = dst_service.host
        servers = []
        try:
            src_server, src = await serve(source_service)
            servers.append(src_server)
            dst_server, dst = await serve(dst_service)
            servers.append(dst_server)
            async with grpc.aio.insecure_channel(dst) as channel:
                return await body(worker_pb2_grpc.WorkerStub(channel), src, dst_host)
        finally:
            for server in servers:
                await server.stop(None)
    return asyncio.run(main())


def test_several_blocks_come_in_one_call_with_their_caches(parts):
    src_host = source_host(parts)
    service = CountingService(src_host)

    async def body(stub, src, dst_host):
        reply = await stub.PullBlocks(pull_request(parts, src, BLOCKS), timeout=60)
        # decoding went on at the source: the delta brings the new rows, again in one call
        for block in BLOCKS:
            if block.startswith("attn"):
                src_host.run_call("a", 6, {"x": torch.randn(1, 1, parts.shape.hidden_size)},
                                  [OpSpec(block, ["x"], "y")], ["y"])
        delta = await stub.PullBlocks(pull_request(parts, src, BLOCKS, delta=True), timeout=60)
        return reply, delta, dst_host

    reply, delta, dst_host = run_pair(parts, service, body)
    assert [r.block_id for r in reply.blocks] == BLOCKS  # in the order asked
    assert all(r.weights_sent for r in reply.blocks)  # the destination had none
    assert [r.rows for r in reply.blocks] == [9, 9, 9, 0, 0]
    assert [r.rows for r in delta.blocks] == [1, 1, 1, 0, 0] and not any(r.weights_sent for r in delta.blocks)
    assert service.calls == ["ExportBlockStates", "ExportBlockStates"]  # one call per pull, not per block
    for block in BLOCKS:
        assert cache_lengths(dst_host, block) == cache_lengths(src_host, block)
        if block.startswith("attn"):
            for session in ("a", "b"):
                theirs, ours = src_host._block(block).caches[session], dst_host._block(block).caches[session]
                k, v = theirs.export(0)
                k2, v2 = ours.export(0)
                assert torch.equal(k, k2) and torch.equal(v, v2)


def test_only_the_first_payload_of_a_stream_samples_the_link(parts, monkeypatch):
    """While the destination imports one payload, gRPC has already buffered the next ones, whose
    chunks then read at memory speed: a rate from them once said that a 1 Gbit/s link carried
    760 GB/s, and the controller planned on it. Only a stream's first payload is a sample."""
    monkeypatch.setattr(migration_service, "LINK_SAMPLE_BYTES", 1)  # the tiny blocks count as samples
    destination = WorkerService(BlockHost("dst"))
    samples = []
    record = destination.links.record

    def spy(peer, bandwidth, latency, source):
        samples.append((source, bandwidth))
        record(peer, bandwidth, latency, source)

    monkeypatch.setattr(destination.links, "record", spy)

    async def body(stub, src, dst_host):
        return await stub.PullBlocks(pull_request(parts, src, BLOCKS), timeout=60)

    reply = run_pair(parts, WorkerService(source_host(parts)), body, destination)
    assert [r.block_id for r in reply.blocks] == BLOCKS
    transfers = [bandwidth for source, bandwidth in samples if source == "transfer"]
    assert len(transfers) == 1 and transfers[0] > 0, samples
    [link] = destination.links.links.values()
    assert link.bandwidth_bytes_per_second == transfers[0]


@pytest.mark.parametrize("blocks, code, words", [
    ([], "INVALID_ARGUMENT", "1 to"),
    (["attn(0,0)", "attn(0,0)"], "INVALID_ARGUMENT", "twice"),
    (["attn(0,0)", "attn(7,0)"], "NOT_FOUND", "attn(7,0)"),  # the source has no such block
    (["attn(0,0)", "nonsense"], "INVALID_ARGUMENT", "nonsense"),
])
def test_a_bad_pull_is_a_clear_error_and_both_workers_keep_serving(parts, blocks, code, words):
    src_host = source_host(parts)

    async def body(stub, src, dst_host):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PullBlocks(pull_request(parts, src, blocks), timeout=60)
        again = await stub.PullBlocks(pull_request(parts, src, ["attn(1,0)"]), timeout=60)
        return caught.value, again

    err, again = run_pair(parts, WorkerService(src_host), body)
    assert err.code().name == code and words in err.details(), err.details()
    assert [r.rows for r in again.blocks] == [9]


def test_a_stream_cut_short_is_data_loss(parts):
    async def body(stub, src, dst_host):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PullBlocks(pull_request(parts, src, BLOCKS[:3]), timeout=60)
        return caught.value

    err = run_pair(parts, CutShort(source_host(parts)), body)
    assert err.code() is grpc.StatusCode.DATA_LOSS and "after 1 of 3 blocks" in err.details(), err.details()


def test_pulls_go_in_batches_per_source_and_destination():
    moves = [Move(f"b{i}", "a", "x") for i in range(5)] + [Move("c0", "b", "x"), Move("c1", "a", "y")]
    batches = pull_batches(moves, batch_blocks=2)
    assert [[m.block for m in b] for b in batches] == [["b0", "b1"], ["b2", "b3"], ["b4"], ["c0"], ["c1"]]
    with pytest.raises(ValueError):
        pull_batches(moves, batch_blocks=0)


def test_a_paced_chunk_is_about_ten_ms_of_the_rate():
    assert paced_chunk_bytes(0.0, 1 << 20) == 1 << 20  # unpaced: the configured chunk
    assert paced_chunk_bytes(1e6, 1 << 20) == PACED_CHUNK_BYTES  # slow link: the small chunk
    assert paced_chunk_bytes(2e7, 1 << 20) == 200_000
    assert paced_chunk_bytes(1e9, 1 << 20) == 1 << 20  # never over the configured chunk


def test_small_caches_move_at_the_switch_unless_the_source_sends_the_weights():
    assert not precopy_caches("headnode", 1 << 20, switch_cache_bytes=16 << 20)
    assert precopy_caches("headnode", 17 << 20, switch_cache_bytes=16 << 20)
    assert precopy_caches("source", 0, switch_cache_bytes=16 << 20)  # its pull brings the weights anyway
