"""Relay mode without the network: the per-worker programs from relay_plan, run by one
RelayExecutor per worker with messages delivered in a shuffled order, give the block
engine's logits; and the executor rejects what it should."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeheads.controller.spread import WorkerCapacity, round_robin, single, spread
from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.head import HeadNodeCompute
from edgeheads.headnode.relay_driver import program_request
from edgeheads.headnode.relay_plan import HEAD_NODE, relay_plan
from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.headnode.step_plan import compile_plan
from edgeheads.worker.host import BlockHost, HostError, OpSpec
from edgeheads.worker.relay import ProgramCall, RelayExecutor, segments
from edgeheads.worker.relay_service import program_from_proto
from edgeheads.common.wire import sha256_hex, weights_to_blob
from tiny_configs import TINY_CONFIGS

WORKERS = [WorkerCapacity(f"w{i}", 1 << 40) for i in range(3)]


def tiny_parts(name: str = "llama-odd-heads"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


def programs_for(plan) -> dict[str, list[ProgramCall]]:
    """What each worker installs: the head node's InstallProgramRequest, parsed as the worker does."""
    return {w: program_from_proto(program_request(1, plan, w, {peer: peer for peer in plan.programs}))
            for w in plan.programs}


class Cluster:
    """Workers as RelayExecutors; a message queue delivered in random order."""

    def __init__(self, parts, placement, seed: int = 0) -> None:
        self.plan = relay_plan(compile_plan(parts.shape, placement))
        self.head = HeadNodeCompute(parts.shape, parts.head)
        self.rng = random.Random(seed)
        shape_json = json.dumps(parts.shape.to_dict())
        self.executors = {}
        for worker, program in programs_for(self.plan).items():
            host = BlockHost(worker)
            for block, owner in placement.items():
                if owner == worker:
                    blob = weights_to_blob(parts.blocks[block])
                    host.add_weights(blob, sha256_hex(blob))
                    host.bind_block(str(block), shape_json, sha256_hex(blob))
            self.executors[worker] = RelayExecutor(host)
            self.executors[worker].install(1, program)
        self.position = 0
        self.messages = 0

    def step(self, ids: list[int]) -> torch.Tensor:
        x0 = self.head.embed(torch.tensor(ids), self.position)
        queue = [(w, {"x0": x0}) for w in self.plan.head_sends]
        final = None
        while queue:
            dest, values = queue.pop(self.rng.randrange(len(queue)))
            self.messages += 1
            for out, _ in self.executors[dest].deliver("s", 1, self.position, values):
                for to, vals in out:
                    if to == HEAD_NODE:
                        final = vals[self.plan.final]
                    else:
                        queue.append((to, vals))
        assert all(not ex.steps for ex in self.executors.values()), "a step was left half done"
        self.position += len(ids)
        return self.head.logits(final)


@pytest.mark.parametrize("policy", [spread, round_robin, single])
def test_relay_matches_the_block_engine_with_messages_in_any_order(policy):
    parts = tiny_parts()
    engine = BlockEngine(parts)
    cluster = Cluster(parts, policy(parts.shape, WORKERS, 256), seed=policy.__name__.__len__())
    ids = [1, 50, 300, 7, 99]
    torch.testing.assert_close(cluster.step(ids), engine.forward("s", ids), rtol=1e-5, atol=1e-5)
    for token in [5, 17, 301, 4, 4, 60]:
        torch.testing.assert_close(cluster.step([token]), engine.forward("s", [token]), rtol=1e-5, atol=1e-5)


def test_spread_needs_one_phase_per_layer_and_one_message_per_phase():
    parts = tiny_parts()
    cluster = Cluster(parts, spread(parts.shape, WORKERS, 256))
    cluster.step([1, 2, 3])
    layers = parts.shape.n_layers
    assert cluster.plan.phases == layers + 1  # layer 0's first groups run on x0 straight from the head node
    # the head node's x0 (2), one message per layer boundary, and the final reply
    assert cluster.messages + 1 == cluster.plan.messages() == 2 + (layers - 1) + 1 + 1


def test_segments_send_each_destination_as_soon_as_its_values_exist():
    ops = [OpSpec("proj(0)", ["x0", "a0.0"], "h0"), OpSpec("ffn(0)", ["h0"], "x1"),
           OpSpec("attn(1,0)", ["x1"], "a1.0")]
    call = ProgramCall(ops, ["x0", "a0.0"], ["x1", "a1.0"], {"w1": ["x1"], "w2": ["x1", "a1.0"]})
    segs = segments(call)
    assert [[o.output for o in s.ops] for s in segs] == [["h0", "x1"], ["a1.0"]]
    assert segs[0].routes == [("w1", ["x1"])] and segs[1].routes == [("w2", ["x1", "a1.0"])]
    assert segs[0].returns == ["x1"] and segs[1].inputs == ["x1"]


def test_executor_rejects_bad_programs_and_values():
    parts = tiny_parts()
    placement = single(parts.shape, WORKERS, 256)
    cluster = Cluster(parts, placement)
    worker, executor = next(iter(cluster.executors.items()))
    x0 = cluster.head.embed(torch.tensor([1, 2]), 0)
    with pytest.raises(HostError) as err:
        list(executor.deliver("s", 7, 0, {"x0": x0}))
    assert err.value.code == "FAILED_PRECONDITION"
    with pytest.raises(HostError) as err:
        list(executor.deliver("s", 1, 0, {"h3": x0}))
    assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(HostError) as err:  # a block the worker does not hold
        executor.install(2, [ProgramCall([OpSpec("ffn(99)", ["x0"], "y")], ["x0"], ["y"], {})])
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(HostError):
        executor.install(2, [ProgramCall([OpSpec("ffn(0)", ["x0"], "y")], ["x0"], [], {"w9": ["y"]})])
    # a wrong position fails the step, leaves nothing behind, and the session goes on at the right one
    with pytest.raises(HostError) as err:
        list(executor.deliver("s", 1, 5, {"x0": x0}))
    assert err.value.code == "NOT_FOUND" and not executor.steps
    out = [o.messages for o in executor.deliver("s", 1, 0, {"x0": x0})]
    assert out[-1][0][0] == HEAD_NODE
