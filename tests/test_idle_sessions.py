"""A worker drops sessions that have seen no call for its TTL (worker/idle_sessions.py): the
caches and the relay steps a dead head node left behind go, and their memory with them; a
session that is called goes on, however long it lives; a dropped session stays ended."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeheads.common.config import GrpcSettings
from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.worker.host import HostError, OpSpec
from edgeheads.worker.idle_sessions import expire_idle_sessions, sweep_period
from edgeheads.worker.relay import ProgramCall
from edgeheads.worker.relay_endpoint import RelayEndpoint
from tiny_configs import TINY_CONFIGS
from test_migration_state import BLOCK, host_with, step

TTL = 60.0


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """time.monotonic() as the test sets it."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    return now


def test_an_idle_session_is_dropped_and_its_memory_freed(parts, clock):
    host = host_with(parts, "w", [BLOCK])
    relay = RelayEndpoint(host, GrpcSettings())
    weights_only = host.memory_used_bytes()
    hidden = parts.shape.hidden_size
    step(host, "orphan", 0, torch.randn(1, 5, hidden))
    step(host, "alive", 0, torch.randn(1, 5, hidden))
    assert host.memory_used_bytes() > weights_only
    clock[0] += TTL / 2
    assert expire_idle_sessions(host, relay, TTL) == []
    step(host, "alive", 5, torch.randn(1, 1, hidden))  # called again: its clock starts over
    clock[0] += TTL / 2 + 1
    assert expire_idle_sessions(host, relay, TTL) == ["orphan"]
    assert host.sessions() == {"alive"}
    with pytest.raises(HostError) as late:  # a late call of the dropped session makes no cache
        step(host, "orphan", 5, torch.randn(1, 1, hidden))
    assert late.value.code == "FAILED_PRECONDITION"
    clock[0] += TTL
    assert expire_idle_sessions(host, relay, TTL) == ["alive"]
    assert host.sessions() == set() and host.last_used == {}
    assert host.memory_used_bytes() == weights_only


def test_a_call_longer_than_the_ttl_leaves_its_session_fresh(parts, clock, monkeypatch):
    host = host_with(parts, "w", [BLOCK])
    relay = RelayEndpoint(host, GrpcSettings())
    checked = host._check_request

    def then_a_long_compute(*args):
        checked(*args)
        clock[0] += 2 * TTL  # the call itself outlasts the TTL
    monkeypatch.setattr(host, "_check_request", then_a_long_compute)
    step(host, "prefill", 0, torch.randn(1, 7, parts.shape.hidden_size))
    clock[0] += 1
    assert expire_idle_sessions(host, relay, TTL) == []
    assert host.sessions() == {"prefill"}


def test_a_relay_step_left_waiting_for_inputs_is_dropped(parts):
    host = host_with(parts, "w", [BLOCK])
    relay = RelayEndpoint(host, GrpcSettings())
    # one call that needs two inputs: the head node died after sending only one of them
    relay.executor.install(1, [ProgramCall(ops=[OpSpec(BLOCK, ["x"], "a")], inputs=["x", "y"], keep=["a"],
                                           routes={"": ["a"]})])
    list(relay.executor.deliver("half", 1, 0, {"x": torch.randn(1, 1, parts.shape.hidden_size)}))
    assert set(relay.executor.steps) == {("half", 1, 0)}
    assert expire_idle_sessions(host, relay, TTL, now=5000.0) == []  # its clock starts when first seen
    assert expire_idle_sessions(host, relay, TTL, now=5000.0 + TTL / 2) == []
    assert expire_idle_sessions(host, relay, TTL, now=5000.0 + TTL + 1) == ["half"]
    assert relay.executor.steps == {}


def test_refused_calls_leave_no_clock_behind(parts):
    host = host_with(parts, "w", [BLOCK])
    relay = RelayEndpoint(host, GrpcSettings())
    with pytest.raises(HostError):  # position 3 of a session this worker never saw
        step(host, "stranger", 3, torch.randn(1, 1, parts.shape.hidden_size))
    assert host.last_used == {}


def test_the_sweep_runs_several_times_per_ttl_and_at_least_every_30_s():
    assert sweep_period(2.0) == 0.5
    assert sweep_period(300.0) == 30.0
    assert sweep_period(0.01) == 0.05
