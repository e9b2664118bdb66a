"""A session the head node ended stays ended on the worker: a call or relay batch still in
flight cannot bring its K/V caches back (it would be held for ever)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.worker.host import HostError, OpSpec
from edgeheads.worker.relay import ProgramCall, RelayExecutor
from tiny_configs import TINY_CONFIGS
from test_migration_state import BLOCK, host_with, step


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


def test_a_late_call_of_an_ended_session_is_refused_and_makes_no_cache(parts):
    host = host_with(parts, "w", [BLOCK])
    hidden = parts.shape.hidden_size
    step(host, "s", 0, torch.randn(1, 3, hidden))
    assert host.sessions() == {"s"}
    assert host.end_session("s") == 1 and host.sessions() == set()
    with pytest.raises(HostError) as err:  # the prompt step of "s", arriving late
        step(host, "s", 0, torch.randn(1, 3, hidden))
    assert err.value.code == "FAILED_PRECONDITION" and "ended" in str(err.value)
    assert host.sessions() == set()
    assert host.memory_used_bytes() == sum(b.weight_bytes for b in host.blocks.values())
    step(host, "other", 0, torch.randn(1, 3, hidden))  # everyone else is served
    assert host.sessions() == {"other"}


def test_a_late_relay_batch_of_an_ended_session_leaves_no_waiting_step(parts):
    host = host_with(parts, "w", [BLOCK])
    relay = RelayExecutor(host)
    # one call that needs two inputs: a batch carrying only one of them waits for the other
    relay.install(1, [ProgramCall(ops=[OpSpec(BLOCK, ["x"], "a")], inputs=["x", "y"], keep=["a"], routes={"": ["a"]})])
    host.end_session("gone")
    with pytest.raises(HostError):
        list(relay.deliver("gone", 1, 0, {"x": torch.randn(1, 1, parts.shape.hidden_size)}))
    assert relay.steps == {}
