"""The pure parts of recovering from a lost worker, and what the controller tells a head node
that lost one: which blocks move, what a replay sends, which placement answers a loss,
failed re-plans published with the workers they were made for, and the repair plan that
moves only the lost worker's blocks."""

from __future__ import annotations

import asyncio

import pytest

from edgeheads.common.spec import SMOLLM2_135M, BlockId, BlockKind, ModelShape, block_memory_bytes
from edgeheads.controller.membership import ClusterState, WorkerRecord
from edgeheads.controller.repair import repair
from edgeheads.controller.service import ControllerService
from edgeheads.controller.spread import InfeasiblePlacement, WorkerCapacity, spread
from edgeheads.headnode.embedded import exit_description
from edgeheads.headnode.placement_feed import PlacementAnswer, PlacementFeed, answers_loss
from edgeheads.headnode.recovery_plan import (block_changes, capacity_message, step_bytes_per_token,
                                              value_bytes_per_token)
from edgeheads.headnode.step_plan import compile_plan
from edgeheads.v1 import controller_pb2

GiB = 1 << 30
TINY = ModelShape("llama", n_layers=3, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96,
                  vocab_size=384)


def attn(layer: int, group: int) -> BlockId:
    return BlockId(layer, BlockKind.ATTENTION, group)


def test_block_changes_unload_what_moves_away_and_load_what_a_worker_lacks():
    a, b, c = attn(0, 0), attn(0, 1), BlockId(0, BlockKind.FFN)
    held = {"w0": {a, b}, "w2": {c}}  # w1 is gone: its blocks are held by nobody
    unload, load = block_changes(held, {a: "w0", b: "w2", c: "w2"})
    assert unload == {"w0": [b]}
    assert load == {b: "w2"}
    unload, load = block_changes({"w0": set()}, {a: "w0"})
    assert unload == {} and load == {a: "w0"}


def test_an_answer_to_a_loss_is_a_newer_placement_without_the_lost_or_a_failed_plan_without_them():
    placement = {attn(0, 0): "w0", attn(0, 1): "w2"}
    newer = PlacementAnswer(5, placement, {"w0": "h:1", "w2": "h:2"}, members=frozenset({"w0", "w2"}))
    assert answers_loss(newer, {"w1"}, after_epoch=4)
    assert not answers_loss(newer, {"w1"}, after_epoch=5)  # not newer than the epoch in use
    assert not answers_loss(newer, {"w2"}, after_epoch=4)  # still places blocks on the lost worker
    failed = PlacementAnswer(4, placement, {}, error="no room", members=frozenset({"w0", "w2"}))
    assert answers_loss(failed, {"w1"}, after_epoch=4)
    assert not answers_loss(failed, {"w2"}, after_epoch=4)  # planned while w2 was a member: stale
    assert answers_loss(PlacementAnswer(4, {}, {}, error="no workers are registered"), {"w0"}, after_epoch=4)


def test_an_answer_comes_from_a_reply_and_a_feed_waits_for_one_that_suits():
    reply = controller_pb2.PlacementReply(epoch=3, members=["w0", "w1"], assignments=[
        controller_pb2.Assignment(block_id="attn(0,1)", worker="w1", address="h:2")])
    answer = PlacementAnswer.from_reply(reply)
    assert answer.placement == {attn(0, 1): "w1"} and answer.addresses == {"w1": "h:2"}
    assert answer.members == {"w0", "w1"} and answer.workers == {"w1"} and not answer.error

    async def run():
        feed = PlacementFeed()
        assert await feed.wait_for(lambda a: True, 0.01) is None
        waiting = asyncio.create_task(feed.wait_for(lambda a: a.epoch >= 3, 5))
        await feed.publish(PlacementAnswer(2, {}, {}))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await feed.publish(answer)
        assert await waiting is answer
        assert await feed.wait_for(lambda a: a.epoch == 3, 0) is answer  # already there: no wait
    asyncio.run(run())


def test_a_replay_moves_what_the_plan_sends_per_token():
    d = TINY.hidden_size * TINY.bytes_per_param
    group = TINY.heads_per_group * TINY.head_dim * TINY.bytes_per_param
    assert value_bytes_per_token("x3", TINY) == value_bytes_per_token("h0", TINY) == d
    assert value_bytes_per_token("a1.0", TINY) == group
    alone = compile_plan(TINY, {b: "w0" for b in TINY.block_ids()})
    assert step_bytes_per_token(alone, "relay", TINY) == step_bytes_per_token(alone, "head", TINY) == 2 * d
    plan = compile_plan(TINY, spread(TINY, [WorkerCapacity(f"w{i}", GiB) for i in range(3)], 256))
    relay, head = step_bytes_per_token(plan, "relay", TINY), step_bytes_per_token(plan, "head", TINY)
    assert 2 * d < relay < head  # the head dataflow carries every value twice: in and out


def test_exit_descriptions_name_the_signal_or_the_status():
    assert exit_description(-9) == "signal SIGKILL"
    assert exit_description(1) == "status 1"
    assert exit_description(0) == "status 0"


def test_a_failed_replan_is_published_with_its_members_and_watchers_hear_of_it():
    state = ClusterState("spread")
    total = sum(block_memory_bytes(SMOLLM2_135M, b.kind, 2048) for b in SMOLLM2_135M.block_ids())
    for i in range(3):  # SmolLM2 fits in three of these, not in two
        state.register(WorkerRecord(f"w{i}", f"127.0.0.1:{5000 + i}", int(total / 2.5), 2e10))
    state.set_model(SMOLLM2_135M, "smollm2")
    assert state.current.epoch == 1 and not state.current.error
    assert state.current.members == ("w0", "w1", "w2")
    service = ControllerService(state)

    async def run():
        watch = service.WatchPlacement(controller_pb2.GetPlacementRequest(after_epoch=1), None)
        heard = asyncio.create_task(anext(watch))
        await asyncio.sleep(0.01)
        assert not heard.done()  # nothing new yet
        version = state.version
        state.remove("w1", "telemetry stream closed")
        await service.replan_and_wait("membership", "worker w1 left")
        reply = await asyncio.wait_for(heard, 5)
        assert state.version == version + 1
        assert reply.error and reply.epoch == 1 and list(reply.members) == ["w0", "w2"]
        await watch.aclose()
    asyncio.run(run())


def test_the_replan_after_a_worker_left_moves_only_its_blocks_and_the_next_one_plans_afresh():
    state = ClusterState("spread")
    for i in range(3):
        state.register(WorkerRecord(f"w{i}", f"127.0.0.1:{5000 + i}", 4 * GiB, 2e10))
    state.set_model(SMOLLM2_135M, "smollm2")
    before = dict(state.current.placement)
    state.remove("w1", "telemetry stream closed")
    repaired = state.replan("worker w1 left").placement
    assert set(repaired) == set(before) and "w1" not in repaired.values()
    moved = {b for b in before if repaired[b] != before[b]}
    assert moved == {b for b, w in before.items() if w == "w1"}
    assert state.decisions[-1].blocks_moved == len(moved)
    fresh = state.replan("16 tokens since the last plan").placement  # no worker lost now: the policy's own
    assert fresh == spread(SMOLLM2_135M, [WorkerCapacity(w, 4 * GiB) for w in ("w0", "w2")], 2048)


def test_a_repair_puts_lost_blocks_where_the_policy_would_if_they_fit_and_fails_when_none_do():
    workers = [WorkerCapacity(f"w{i}", GiB) for i in range(3)]
    before = spread(TINY, workers, 256)
    survivors = [w for w in workers if w.name != "w0"]
    preferred = spread(TINY, survivors, 256)
    repaired = repair(spread, TINY, survivors, 256, kept_from=before)
    for block, worker in before.items():
        assert repaired[block] == (preferred[block] if worker == "w0" else worker)
    need = sum(block_memory_bytes(TINY, b.kind, 256) for b in TINY.block_ids())
    small = [WorkerCapacity(w.name, need // 3) for w in survivors]
    with pytest.raises(InfeasiblePlacement, match="the most free memory on any remaining worker"):
        repair(spread, TINY, small, 256, kept_from=before)
    with pytest.raises(InfeasiblePlacement, match="no workers"):
        repair(spread, TINY, [], 256, kept_from=before)


def test_more_memory_while_no_placement_fits_asks_for_a_replan_once_per_increase():
    state = ClusterState("spread")
    total = sum(block_memory_bytes(SMOLLM2_135M, b.kind, 2048) for b in SMOLLM2_135M.block_ids())
    for i in range(2):
        state.register(WorkerRecord(f"w{i}", f"127.0.0.1:{5000 + i}", int(total / 2.5), 2e10))
    state.set_model(SMOLLM2_135M, "smollm2")
    assert state.current.error and state.memory_returned("w0") is None  # nothing new yet
    state.heartbeat("w0", memory_available_bytes=int(total / 2.5 * 1.005), memory_used_bytes=0, compute_flops=0)
    assert state.memory_returned("w0") is None  # within the noise margin
    state.heartbeat("w0", memory_available_bytes=total, memory_used_bytes=0, compute_flops=0)
    reason = state.memory_returned("w0")
    assert reason and "w0 has" in reason and "more than when no placement fitted" in reason
    assert state.memory_returned("w0") is None  # once per increase
    assert state.replan(reason).epoch == 1 and not state.current.error
    state.heartbeat("w1", memory_available_bytes=total, memory_used_bytes=0, compute_flops=0)
    assert state.memory_returned("w1") is None  # a placement fits: nothing to ask for


def test_the_capacity_message_names_the_survivors_the_lost_and_the_way_back():
    answer = PlacementAnswer(4, {}, {}, error="ffn(2) need 9 bytes", members=frozenset({"w2", "w0"}))
    message = capacity_message(answer, {"w1"})
    assert message.startswith("the remaining workers (w0, w2) cannot hold the model after losing w1: ffn(2) need 9")
    assert "until a placement fits (a worker joins or gets more memory)" in message
