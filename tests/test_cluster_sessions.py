"""Sessions end one way: however a session ends (it finishes, a step of it fails in the
relay or head dataflow, the executor closes), no K/V cache of it is left on any worker.
Real worker processes on 127.0.0.1, the head node's executor in this process."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from edgeheads.controller.spread import WorkerCapacity, round_robin, spread
from edgeheads.headnode.cluster import ClusterError, ClusterExecutor
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.loading import load_model
from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.common.spec import BlockKind
from test_cluster_weights import large_bytes_held
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

WORKERS = [f"worker-{i}" for i in range(3)]


@pytest.fixture(scope="module")
def tiny(save_tiny_model):
    path = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-sessions", seed=6)
    return load_model(str(path), progress=False)


@pytest.fixture(scope="module")
def workers(tiny):
    with LocalCluster(workers=3, progress=False, with_headnode=False) as cluster:
        yield {w: cluster.addresses[w] for w in WORKERS}


async def caches_on(addresses: dict[str, str]) -> dict[str, int]:
    """worker -> how many sessions it holds K/V caches for (its own report)."""
    counts = {}
    for worker, address in addresses.items():
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await worker_pb2_grpc.WorkerStub(channel).GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10)
            counts[worker] = reply.sessions
    return counts


async def drop_behind_the_head_nodes_back(address: str, session: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await worker_pb2_grpc.WorkerStub(channel).DropSession(worker_pb2.DropSessionRequest(session=session),
                                                              timeout=10)


@pytest.mark.parametrize("dataflow,policy,epoch", [("relay", spread, 11), ("head", round_robin, 12)])
def test_no_cache_is_left_on_any_worker_after_a_session_ends_fails_or_closes(tiny, workers, dataflow, policy, epoch):
    parts = tiny.parts
    placement = policy(parts.shape, [WorkerCapacity(w, 1 << 40) for w in WORKERS], 256)
    engine = BlockEngine(parts)
    # a worker holding attention blocks, and another one, so the failure leaves survivors with caches
    victim = next(w for b, w in sorted(placement.items()) if b.kind is BlockKind.ATTENTION)
    assert len(set(placement.values())) == 3

    # workers refuse a session id once it has ended (ids are single-use), and both
    # parametrizations share the workers: each uses its own ids
    async def run() -> None:
        executor = ClusterExecutor(parts, dataflow=dataflow)
        await executor.apply_placement(epoch, placement, workers, progress=False)
        assert large_bytes_held(executor) == []  # weights were streamed, not kept
        assert await caches_on(workers) == dict.fromkeys(WORKERS, 0)

        async def both(session: str, ids: list[int]) -> int:
            got = await executor.step(session, ids)
            torch.testing.assert_close(got, engine.forward(session, ids), rtol=1e-5, atol=1e-5)
            return int(torch.argmax(got))

        # a session that ends normally
        token = await both(f"{dataflow}-ended", [5, 9, 33, 2])
        for _ in range(3):
            token = await both(f"{dataflow}-ended", [token])
        assert sum((await caches_on(workers)).values()) >= 2
        await executor.end_session(f"{dataflow}-ended")
        engine.drop_session(f"{dataflow}-ended")
        assert await caches_on(workers) == dict.fromkeys(WORKERS, 0)

        # a session whose step fails on one worker, while another session goes on
        kept, failing = await both(f"{dataflow}-kept", [7, 8, 9]), await both(f"{dataflow}-failing", [40, 41])
        failing = await both(f"{dataflow}-failing", [failing])
        await drop_behind_the_head_nodes_back(workers[victim], f"{dataflow}-failing")  # its next step fails there
        with pytest.raises(ClusterError, match="FAILED_PRECONDITION.*has ended"):  # the worker refuses it
            await executor.step(f"{dataflow}-failing", [failing])
        assert f"{dataflow}-failing" not in executor.sessions and f"{dataflow}-kept" in executor.sessions
        counts = await caches_on(workers)
        assert sum(counts.values()) >= 2 and all(n <= 1 for n in counts.values()), counts  # only f"{dataflow}-kept" is left
        for _ in range(2):
            kept = await both(f"{dataflow}-kept", [kept])  # the other session is untouched
        await executor.end_session(f"{dataflow}-kept")
        assert await caches_on(workers) == dict.fromkeys(WORKERS, 0)

        # a session still open when the executor closes
        await executor.step(f"{dataflow}-open", [3, 4])
        assert sum((await caches_on(workers)).values()) >= 2
        await executor.close()
        assert len(executor.sessions) == 0
        assert await caches_on(workers) == dict.fromkeys(WORKERS, 0)
    asyncio.run(run())


def test_a_session_that_fails_at_its_first_step_leaves_nothing_either(tiny, workers):
    parts = tiny.parts
    placement = round_robin(parts.shape, [WorkerCapacity(w, 1 << 40) for w in WORKERS], 256)

    async def run() -> None:
        executor = ClusterExecutor(parts, dataflow="head")
        await executor.apply_placement(13, placement, workers, progress=False)
        too_long = list(range(parts.shape.max_positions + 1))
        with pytest.raises(ValueError, match="exceeds"):
            await executor.step("huge", too_long)
        assert len(executor.sessions) == 0
        await executor.step("ok", [1, 2, 3])
        await executor.close()
        assert await caches_on(workers) == dict.fromkeys(WORKERS, 0)
    asyncio.run(run())
