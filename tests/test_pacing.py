"""Pre-copy pacing (worker/pacing.py): a migration's pre-copy is pulled at a fraction of the
measured link rate, in small chunks, so that decoding's relay frames do not queue behind it;
the switch's delta and unmeasured links are not paced."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from edgeheads.common.wire import ChunkAssembler, sha256_hex, weights_to_blob
from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.v1 import worker_pb2
from edgeheads.worker.host import BlockHost
from edgeheads.worker.pacing import PACED_CHUNK_BYTES, delay_seconds, paced_rate
from edgeheads.worker.service import WorkerService
from tiny_configs import llama

BLOCK = "ffn(0)"


def test_delay_keeps_the_average_rate():
    assert delay_seconds(0, 0.0, 1e6) == 0.0
    assert delay_seconds(500_000, 0.2, 1e6) == pytest.approx(0.3)  # ahead of schedule: wait
    assert delay_seconds(500_000, 0.7, 1e6) == 0.0  # behind: send at once
    assert delay_seconds(10**9, 0.0, 0.0) == 0.0  # unpaced
    assert paced_rate(0.9, 1.25e7) == pytest.approx(1.125e7)
    assert paced_rate(0.9, None) == paced_rate(0.9, 0.0) == paced_rate(0.0, 1.25e7) == 0.0


@pytest.fixture(scope="module")
def source():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama(num_hidden_layers=1, intermediate_size=1024)).eval()
    parts = slice_checkpoint(model.config, dict(model.state_dict()))
    host = BlockHost("src")
    weights = next(w for b, w in parts.blocks.items() if str(b) == BLOCK)
    blob = weights_to_blob(weights)
    host.add_weights(blob, sha256_hex(blob))
    host.bind_block(BLOCK, json.dumps(parts.shape.to_dict()), sha256_hex(blob))
    return WorkerService(host), parts, sha256_hex(blob)


async def export(service: WorkerService, rate: float) -> tuple[list[int], float, bytes]:
    request = worker_pb2.ExportBlockStateRequest(block_id=BLOCK, include_weights=True, max_bytes_per_second=rate)
    sizes, assembler = [], ChunkAssembler(1 << 30)
    start = time.perf_counter()
    async for chunk in service.ExportBlockState(request, None):
        sizes.append(len(chunk.data))
        assembler.add(chunk)
    return sizes, time.perf_counter() - start, assembler.finish()


def test_a_paced_export_is_small_chunks_at_the_rate(source):
    service, _, _ = source
    sizes, fast, blob = asyncio.run(export(service, 0.0))
    total = len(blob)
    assert total > 4 * PACED_CHUNK_BYTES, total  # several paced chunks
    rate = total / 0.4  # the whole block in 0.4 s
    paced_sizes, paced, paced_blob = asyncio.run(export(service, rate))
    assert paced_blob == blob
    assert max(paced_sizes) <= PACED_CHUNK_BYTES < max(sizes)
    # the last chunk goes out when the ones before it are due: (total - last) / rate at least
    assert paced >= 0.95 * (total - paced_sizes[-1]) / rate > fast


def test_pull_paces_the_precopy_from_the_measured_link_but_not_the_delta(source):
    src_service, parts, content_hash = source

    class Recorder:
        def __init__(self) -> None:
            self.requests = []

        def ExportBlockStates(self, request, timeout=None):
            self.requests.append(request)
            return Call(src_service.ExportBlockStates(request, None))

    class Call:  # what a grpc.aio stream call offers the puller
        def __init__(self, chunks) -> None:
            self.chunks = chunks

        def __aiter__(self):
            return self.chunks.__aiter__()

        def cancel(self) -> bool:
            return False

    class Context:
        async def abort(self, code, details):
            raise AssertionError((code, details))

    recorder = Recorder()
    dst = WorkerService(BlockHost("dst"), precopy_link_fraction=0.8)
    dst._source = lambda address: recorder
    shape = json.dumps(parts.shape.to_dict())
    pull = worker_pb2.PullBlockRequest(block_id=BLOCK, source_address="10.0.0.2:1", model_shape_json=shape,
                                       content_hash=content_hash)
    asyncio.run(dst.PullBlock(pull, Context()))  # no measurement of the link yet: unpaced
    dst.links.record("10.0.0.2:1", 5e7, None, "probe")
    pull.delta = True
    asyncio.run(dst.PullBlock(pull, Context()))  # the switch's delta: unpaced
    fresh = WorkerService(BlockHost("dst2"), precopy_link_fraction=0.8)
    fresh._source = lambda address: recorder
    fresh.links.record("10.0.0.2:1", 5e7, None, "probe")
    pull.delta = False
    asyncio.run(fresh.PullBlock(pull, Context()))
    assert [r.max_bytes_per_second for r in recorder.requests] == [0.0, 0.0, pytest.approx(4e7)]
    assert fresh.links.links["10.0.0.2:1"].bandwidth_bytes_per_second == 5e7  # a paced pull measures nothing
