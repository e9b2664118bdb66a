"""Properties over random instances: memory always holds, infeasibility is reported,
and no heuristic beats the exact optimum."""

import pytest
from hypothesis import given, settings, strategies as st

from edgeheads.controller import costmodel
from edgeheads.controller.algorithms import ALGORITHMS, make_algorithm
from edgeheads.controller.exact import cpsat
from edgeheads.controller.instances import perturbed, random_small_problem
from edgeheads.controller.problem import Infeasible, Placement

HEURISTICS = [name for name in ALGORITHMS if name != "exact"]

instances = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 1_000_000),
        "n_devices": st.integers(1, 4),
        "n_layers": st.integers(1, 2),
        "kv_groups": st.integers(1, 3),
        "memory_use": st.floats(0.2, 1.05),
        "headnode": st.booleans(),
        "interval_tokens": st.sampled_from([1, 4]),
    }
)


@settings(max_examples=30, deadline=None)
@given(spec=instances)
def test_fresh_placements_fit_in_memory_and_never_beat_the_optimum(spec):
    pr = random_small_problem(**spec)
    exact = cpsat(pr, time_limit_seconds=30)
    for name in HEURISTICS:
        decision = make_algorithm(name).place(pr, None)
        # an instance CP-SAT proves infeasible is infeasible for every heuristic, and
        # heuristics may fail to pack a feasible instance, never the reverse
        assert exact.status != "INFEASIBLE" or isinstance(decision, Infeasible), name
        if isinstance(decision, Infeasible):
            continue
        assert not costmodel.memory_violations(pr, decision), name
        value = costmodel.objective_seconds(pr, decision)
        assert value >= exact.objective_seconds * (1 - 1e-6), (name, value, exact.objective_seconds)


@settings(max_examples=20, deadline=None)
@given(spec=instances, memory_scale=st.floats(1.0, 1.3), noise_seed=st.integers(0, 1000))
def test_warm_decisions_fit_and_never_beat_the_optimum(spec, memory_scale, noise_seed):
    pr = random_small_problem(**spec)
    first = make_algorithm("resource-aware").place(pr, None)
    if isinstance(first, Infeasible):
        return
    nxt = perturbed(pr, noise_seed, memory_scale=memory_scale)
    exact = cpsat(nxt, first, time_limit_seconds=30)
    for name in ("resource-aware", "dynamic-layer", "greedy", "block-round-robin"):
        decision = make_algorithm(name).place(nxt, first)
        assert exact.status != "INFEASIBLE" or isinstance(decision, Infeasible), name
        if isinstance(decision, Infeasible):
            continue
        assert not costmodel.memory_violations(nxt, decision), name
        value = costmodel.objective_seconds(nxt, decision, first)
        assert value >= exact.objective_seconds * (1 - 1e-6), (name, value, exact.objective_seconds)


@pytest.mark.parametrize("seed", range(12))
def test_resource_aware_close_to_optimum_on_small_instances(seed):
    # Not a timing test: a quality floor that fails if the search regresses badly.
    pr = random_small_problem(seed, n_devices=3 + seed % 3, n_layers=2, kv_groups=2 + seed % 2, memory_use=0.5)
    exact = cpsat(pr, time_limit_seconds=30)
    decision = make_algorithm("resource-aware").place(pr, None)
    assert isinstance(decision, Placement)
    assert costmodel.objective_seconds(pr, decision) <= 1.25 * exact.objective_seconds
