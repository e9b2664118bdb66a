"""The controller's state: re-plans, decisions with reasons and predictions, memory
violations, the shuffle test policy and placement algorithms as policies."""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import pytest

from edgeheads.controller.epochs import solve_plan
from edgeheads.controller.membership import ClusterState, WorkerRecord
from edgeheads.controller.service import ControllerService
from edgeheads.v1 import controller_pb2, controller_pb2_grpc
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
    state = cluster("shuffle")  # every re-plan moves blocks, so every tick is a new epoch

    async def run() -> None:
        service = ControllerService(state, replan_every_tokens=0)
        timer = asyncio.create_task(service.replan_timer(0.05))
        try:
            async with service.changed:  # notified on every new epoch
                await asyncio.wait_for(service.changed.wait_for(lambda: state.current.epoch >= 4), timeout=30)
        finally:
            timer.cancel()
    asyncio.run(run())
    timed = [d for d in state.decisions if "timed re-plan" in d.reason]
    assert len(timed) >= 3 and state.current.epoch == 1 + len(timed)


class GatedPolicy:
    """spread, but each call waits (in the solver's thread) until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, shape, workers, context_tokens):
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise AssertionError("the test never released the placement")
        return spread(shape, workers, context_tokens)


def note_heartbeats(state: ClusterState) -> asyncio.Event:
    """An event set whenever the state takes a heartbeat."""
    heard = asyncio.Event()
    heartbeat = state.heartbeat

    def noting_heartbeat(*args, **kwargs):
        ok = heartbeat(*args, **kwargs)
        heard.set()
        return ok
    state.heartbeat = noting_heartbeat
    return heard


def test_heartbeats_and_status_are_served_while_a_slow_placement_runs():
    """The policy runs in a worker thread: while it is stuck, the event loop still takes
    telemetry and answers ListWorkers; the held-back SetModel then publishes epoch 1."""
    state = ClusterState("spread")
    for i in range(2):
        state.register(WorkerRecord(f"w{i}", f"127.0.0.1:{5000 + i}", 4 * GiB, 2e10))
    policy = state._policy = GatedPolicy()
    heard = note_heartbeats(state)

    async def run() -> None:
        server = grpc.aio.server()
        controller_pb2_grpc.add_ControllerServicer_to_server(ControllerService(state), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = controller_pb2_grpc.ControllerStub(channel)
                set_model = asyncio.ensure_future(stub.SetModel(controller_pb2.SetModelRequest(
                    model_shape_json=json.dumps(SMOLLM2_135M.to_dict()), model_name="smollm2"), timeout=60))
                assert await asyncio.to_thread(policy.entered.wait, 30), "placement never started"
                telemetry = stub.Telemetry()
                await telemetry.write(controller_pb2.TelemetryReport(
                    name="w0", memory_available_bytes=4 * GiB, memory_used_bytes=123, compute_flops=2e10))
                await asyncio.wait_for(heard.wait(), timeout=10)
                listed = await stub.ListWorkers(controller_pb2.ListWorkersRequest(), timeout=10)
                assert not set_model.done(), "the placement finished before the heartbeat was served"
                assert {w.name: w.memory_used_bytes for w in listed.workers} == {"w0": 123, "w1": 0}
                policy.gate.set()
                reply = await set_model
                assert reply.epoch == 1 and len(reply.assignments) == len(SMOLLM2_135M.block_ids())
                telemetry.cancel()
        finally:
            policy.gate.set()
            await server.stop(None)
    asyncio.run(run())


def test_a_placement_onto_a_worker_that_left_during_the_solve_is_dropped():
    state = cluster("spread", n=2)
    inputs = state.plan_inputs()
    state.remove("w1", "test")
    outcome = solve_plan(inputs)  # still uses w1: the snapshot was taken before it left
    assert "w1" in set(outcome.values())
    assert state.apply_plan(inputs, outcome, "late").epoch == 1
    assert state.replan("worker w1 left").epoch == 2 and set(state.current.placement.values()) == {"w0"}


def test_a_registration_that_triggers_a_slow_placement_returns_at_once_and_its_plan_still_lands():
    """The worker whose arrival starts the solve is not held up by it: Register answers and its
    heartbeats are read while the policy is stuck, and the plan it asked for is applied after."""
    state = ClusterState("spread")
    state.register(WorkerRecord("w0", "127.0.0.1:5000", 4 * GiB, 2e10))
    state.announce_model(SMOLLM2_135M, "smollm2")
    state.replan("first")
    policy = state._policy = GatedPolicy()
    heard = note_heartbeats(state)

    async def run() -> None:
        server = grpc.aio.server()
        service = ControllerService(state)
        controller_pb2_grpc.add_ControllerServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = controller_pb2_grpc.ControllerStub(channel)
                await stub.Register(controller_pb2.RegisterRequest(
                    name="w1", address="127.0.0.1:5001", memory_available_bytes=4 * GiB, compute_flops=2e10),
                    timeout=10)
                assert await asyncio.to_thread(policy.entered.wait, 30), "the join did not start a placement"
                telemetry = stub.Telemetry()
                await telemetry.write(controller_pb2.TelemetryReport(
                    name="w1", memory_available_bytes=4 * GiB, memory_used_bytes=7, compute_flops=2e10))
                await asyncio.wait_for(heard.wait(), timeout=10)
                assert state.current.epoch == 1, "the placement finished before the heartbeat was read"
                policy.gate.set()
                async with service.changed:
                    await asyncio.wait_for(service.changed.wait_for(lambda: state.current.epoch == 2), 30)
                assert set(state.current.placement.values()) == {"w0", "w1"}
                telemetry.cancel()
        finally:
            policy.gate.set()
            await server.stop(None)
    asyncio.run(run())
