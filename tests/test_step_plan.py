"""The step planner: phases per layer, one message per worker per phase, fusion."""

from __future__ import annotations

import pytest

from edgeheads.controller.spread import InfeasiblePlacement, WorkerCapacity, round_robin, single, spread
from edgeheads.headnode.step_plan import compile_plan
from edgeheads.common.spec import GPT2_SMALL, SMOLLM2_135M, BlockId, BlockKind, block_memory_bytes

WORKERS = [WorkerCapacity(f"w{i}", 1 << 40) for i in range(3)]


@pytest.mark.parametrize("shape", [SMOLLM2_135M, GPT2_SMALL])
def test_spread_gives_one_phase_per_layer_with_heads_on_two_workers(shape):
    placement = spread(shape, WORKERS, 2048)
    for layer in range(shape.n_layers):
        groups = {placement[b] for b in shape.block_ids() if b.layer == layer and b.kind is BlockKind.ATTENTION}
        proj = placement[BlockId(layer, BlockKind.PROJECTION)]
        assert proj == placement[BlockId(layer, BlockKind.FFN)] == f"w{layer % 3}"
        # the heads sit on the workers that make the layer's input and that project it
        assert groups == {f"w{(layer - 1) % 3}", proj}
    plan = compile_plan(shape, placement)
    # layer 0's groups on the last worker read x0 from the head node: one extra phase
    assert len(plan.phases) == shape.n_layers + 1
    assert plan.messages() == shape.n_layers + 2
    assert_one_call_per_worker_per_phase(plan, placement)


@pytest.mark.parametrize("shape", [SMOLLM2_135M, GPT2_SMALL])
def test_round_robin_gives_two_phases_per_layer_and_one_message_per_worker(shape):
    placement = round_robin(shape, WORKERS, 2048)
    for layer in range(shape.n_layers):
        groups = {placement[b] for b in shape.block_ids() if b.layer == layer and b.kind is BlockKind.ATTENTION}
        proj = placement[BlockId(layer, BlockKind.PROJECTION)]
        assert proj == placement[BlockId(layer, BlockKind.FFN)]
        assert len(groups) == 2 and proj not in groups  # heads on the two workers that do not project
    plan = compile_plan(shape, placement)
    assert len(plan.phases) == 2 * shape.n_layers
    # the groups on the previous layer's projection worker ride in its call: one attention call per layer
    assert plan.messages() == 2 * shape.n_layers + 1
    assert_one_call_per_worker_per_phase(plan, placement)


def assert_one_call_per_worker_per_phase(plan, placement):
    for phase in plan.phases:
        workers = [c.worker for c in phase.calls]
        assert len(workers) == len(set(workers))
    # every op appears exactly once, on the worker the placement names
    ran = [(op.block, call.worker) for p in plan.phases for call in p.calls for op in call.ops]
    assert sorted(ran) == sorted(placement.items())


def test_one_worker_runs_the_whole_model_in_one_call():
    plan = compile_plan(SMOLLM2_135M, single(SMOLLM2_135M, WORKERS, 2048))
    assert len(plan.phases) == 1 and len(plan.phases[0].calls) == 1
    call = plan.phases[0].calls[0]
    assert call.inputs == ["x0"] and call.returns == [f"x{SMOLLM2_135M.n_layers}"]


@pytest.mark.parametrize("policy", [spread, round_robin])
def test_values_flow_only_through_returns_and_inputs(policy):
    plan = compile_plan(SMOLLM2_135M, policy(SMOLLM2_135M, WORKERS, 2048))
    at_head = {"x0"}
    for phase in plan.phases:
        for call in phase.calls:
            assert set(call.inputs) <= at_head, "a call needs a value the head node does not have yet"
        for call in phase.calls:
            at_head |= set(call.returns)
    assert plan.final in at_head


@pytest.mark.parametrize("policy", [spread, round_robin])
def test_policies_respect_memory_and_report_infeasible(policy):
    shape = SMOLLM2_135M
    attn = block_memory_bytes(shape, BlockKind.ATTENTION, 2048)
    tight = [WorkerCapacity("big", 1 << 40), WorkerCapacity("tiny", attn - 1)]
    placement = policy(shape, tight, 2048)
    assert set(placement.values()) == {"big"}
    with pytest.raises(InfeasiblePlacement, match="need"):
        policy(shape, [WorkerCapacity("a", attn * 10), WorkerCapacity("b", attn * 10)], 2048)
    with pytest.raises(InfeasiblePlacement, match="no workers"):
        policy(shape, [], 2048)
