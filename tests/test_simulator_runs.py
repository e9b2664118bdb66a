"""The simulator: same environment for every algorithm, records, migrations, overflow."""

import numpy as np
import pytest

from edgeheads.controller import costmodel
from edgeheads.controller.algorithms import make_algorithm
from edgeheads.controller.problem import Placement, Problem
from edgeheads.controller.scenario import materialize, parse_scenario
from edgeheads.controller.simulator import Environment, simulate


def scenario(**overrides):
    data = {
        "name": "run",
        "seed": 11,
        "model": {"shape": {"arch": "llama", "n_layers": 3, "hidden_size": 64, "n_heads": 4, "n_kv_heads": 2,
                            "head_dim": 16, "intermediate_size": 128, "vocab_size": 100}},
        "prompt_tokens": 8,
        "new_tokens": 30,
        "interval_tokens": 5,
        "migration_horizon_tokens": 30,
        "devices": {"count": 4, "memory_bytes": {"uniform": [2.0e5, 4.0e5]},
                    "peak_flops_per_second": {"lognormal": {"median": 1.0e9, "sigma": 0.5}}},
        "links": {"bandwidth_bytes_per_second": {"uniform": [1.0e6, 1.0e7]}, "latency_seconds": {"value": 0.001}},
        "background": {"start_probability_per_token": 0.1, "duration_tokens": {"uniform": [3, 10]},
                       "compute_fraction": {"uniform": [0.5, 0.9]}, "memory_fraction": {"uniform": [0.0, 0.5]},
                       "bandwidth_jitter_fraction": 0.2},
    }
    data.update(overrides)
    return materialize(parse_scenario(data))


def test_environment_is_the_same_for_every_run():
    setup = scenario()
    a, b = Environment(setup), Environment(setup)
    for step in range(30):
        ca, cb = a.step(step), b.step(step)
        assert np.array_equal(ca.available_flops_per_second, cb.available_flops_per_second)
        assert np.array_equal(ca.memory_bytes, cb.memory_bytes)
    assert np.all(ca.available_flops_per_second <= setup.cluster.peak_flops_per_second)


def test_records_add_up():
    setup = scenario()
    run = simulate(setup, make_algorithm("resource-aware"))
    assert run.failed is None and len(run.tokens) == 30
    assert run.decisions == 6
    assert [t.decision_seconds is not None for t in run.tokens] == [s % 5 == 0 for s in range(30)]
    for t in run.tokens:
        assert t.latency_seconds == pytest.approx(t.inference_seconds + t.migration_seconds + t.paging_seconds)
        assert t.memory_max_bytes <= t.memory_sum_bytes
        assert t.context_tokens == 8 + t.step + 1
    assert run.summary()["total_latency_seconds"] == pytest.approx(sum(t.latency_seconds for t in run.tokens))


def test_static_never_migrates_and_pays_for_overflow():
    setup = scenario(background={"start_probability_per_token": 0.03, "duration_tokens": {"value": 100},
                                 "compute_fraction": {"value": 0.0}, "memory_fraction": {"value": 0.6}})
    static = simulate(setup, make_algorithm("static"))
    assert static.total_migration_seconds == 0.0
    overflowing = [t for t in static.tokens if t.overflow_bytes > 0]
    assert overflowing
    for t in overflowing:
        assert t.paging_seconds == pytest.approx(t.overflow_bytes / setup.scenario.swap_bandwidth_bytes_per_second)
    dynamic = simulate(setup, make_algorithm("resource-aware"))
    assert dynamic.summary()["total_paging_seconds"] < static.summary()["total_paging_seconds"]


def test_per_token_latency_matches_the_cost_model():
    setup = scenario(background={"start_probability_per_token": 0.0})
    run = simulate(setup, make_algorithm("edgeshard"))
    first = make_algorithm("edgeshard").place(
        Problem.build(setup.demand, setup.cluster, 9, 5, 30, setup.headnode), None
    )
    assert isinstance(first, Placement)
    for t in run.tokens[:3]:
        now = Problem.build(setup.demand, setup.cluster, t.context_tokens, 1, 1, setup.headnode)
        assert t.inference_seconds == pytest.approx(costmodel.token_latency_seconds(now, first))


def test_an_impossible_start_is_reported_as_failed():
    setup = scenario(devices={"explicit": [{"name": "x", "memory_bytes": 10.0, "peak_flops_per_second": 1.0e9}]})
    run = simulate(setup, make_algorithm("resource-aware"))
    assert run.failed and "step 0" in run.failed
    assert run.total_latency_seconds == float("inf")
