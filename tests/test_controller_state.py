"""The controller's state: re-plans, decisions with reasons and predictions, memory
violations, the shuffle test policy and placement algorithms as policies."""

from __future__ import annotations

import pytest

from edgeheads.controller.membership import ClusterState, WorkerRecord
from edgeheads.controller.shuffle import Shuffle
from edgeheads.controller.spread import InfeasiblePlacement, WorkerCapacity, spread
from edgeheads.common.spec import SMOLLM2_135M, block_memory_bytes

GiB = 1 << 30


def cluster(policy: str, memory: int = 4 * GiB, n: int = 3, **kw) -> ClusterState:
    state = ClusterState(policy, **kw)
    for i in range(n):
        state.register(WorkerRecord(f"w{i}", f"127.0.0.1:{5000 + i}", memory, 2e10))
    state.set_model(SMOLLM2_135M, "smollm2")
    return state


def test_a_replan_with_the_same_result_publishes_nothing_and_decisions_are_kept():
    state = cluster("spread")
    assert state.current.epoch == 1
    assert state.replan("16 tokens since the last plan").epoch == 1
    [decision] = state.decisions
    assert decision.reason == "model announced" and decision.blocks_moved == 0
    assert sum(decision.blocks_per_worker.values()) == len(SMOLLM2_135M.block_ids())
    assert decision.predicted_token_seconds > 0


def test_memory_violation_replans_once_per_episode_and_moves_blocks_off():
    state = cluster("spread")
    w1 = state.workers["w1"]
    before = sum(1 for w in state.current.placement.values() if w == "w1")
    state.heartbeat("w1", memory_available_bytes=GiB // 20, memory_used_bytes=GiB // 10, compute_flops=0)
    reason = state.memory_violation("w1")
    assert reason and "memory violation on w1" in reason
    assert state.memory_violation("w1") is None  # still over, but already handled
    state.replan(reason)
    after = sum(1 for w in state.current.placement.values() if w == "w1")
    assert state.current.epoch == 2 and after < before
    assert state.decisions[-1].reason == reason and state.decisions[-1].blocks_moved > 0
    state.heartbeat("w1", memory_available_bytes=4 * GiB, memory_used_bytes=0, compute_flops=0)
    assert state.memory_violation("w1") is None and not w1.over_budget


def test_shuffle_moves_the_asked_number_of_blocks_within_memory_and_repeats_with_its_seed():
    shape = SMOLLM2_135M
    workers = [WorkerCapacity(f"w{i}", 4 * GiB) for i in range(3)]
    start = spread(shape, workers, 2048)
    first = Shuffle(moves=3, seed=7)(shape, workers, 2048, previous=start)
    again = Shuffle(moves=3, seed=7)(shape, workers, 2048, previous=start)
    assert first == again and sum(first[b] != start[b] for b in start) == 3
    smallest = min(block_memory_bytes(shape, b.kind, 2048) for b in start)
    tight = [WorkerCapacity("w0", 4 * GiB), WorkerCapacity("w1", smallest - 1)]  # w1 has no room for anything
    only_w0 = {b: "w0" for b in start}
    moved = Shuffle(moves=5, seed=1)(shape, tight, 2048, previous=only_w0)
    assert moved == only_w0


@pytest.mark.parametrize("policy", ["resource-aware", "edgeshard"])
def test_placement_algorithms_run_as_policies(policy):
    state = cluster(policy)
    assert set(state.current.placement) == set(SMOLLM2_135M.block_ids())
    assert not state.current.error and state.decisions[-1].predicted_token_seconds > 0
    starved = cluster(policy, memory=1 << 20)
    assert starved.current.error  # nothing fits: the error is kept, no epoch is published
    assert starved.current.epoch == 0


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="resource-aware"):
        ClusterState("best")
    with pytest.raises(InfeasiblePlacement):
        spread(SMOLLM2_135M, [], 2048)


def test_the_timer_replans_while_nothing_is_generated():
    import asyncio

    from edgeheads.controller.service import ControllerService

    state = cluster("shuffle")  # every re-plan moves blocks, so every tick is a new epoch

    async def run() -> None:
        service = ControllerService(state, replan_every_tokens=0)
        timer = asyncio.create_task(service.replan_timer(0.05))
        await asyncio.sleep(0.32)
        timer.cancel()
    asyncio.run(run())
    timed = [d for d in state.decisions if "timed re-plan" in d.reason]
    assert len(timed) >= 3 and state.current.epoch == 1 + len(timed)
