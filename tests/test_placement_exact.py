"""Exact solvers: hand-built instances with a known optimum, and exhaustive == CP-SAT."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgeheads.controller import costmodel
from edgeheads.controller.exact import Exact, cpsat, exhaustive
from edgeheads.controller.instances import perturbed, random_small_problem
from edgeheads.controller.problem import Cluster, Device, Infeasible, Placement, uniform_problem
from edgeheads.controller.resource_aware import ResourceAware


def tiny(memory, flops, bandwidth=1e6, latency=0.001, n_layers=1, kv_groups=2, **kw):
    devices = [Device(f"d{i}", m, f, f) for i, (m, f) in enumerate(zip(memory, flops))]
    cluster = Cluster.from_devices(devices, bandwidth, latency)
    figures = dict(
        attention_memory_bytes=10, projection_memory_bytes=20, ffn_memory_bytes=40,
        attention_flops=1e6, projection_flops=2e6, ffn_flops=4e6,
        attention_output_bytes=1000, residual_bytes=2000,
    )
    figures.update(kw)
    return uniform_problem(cluster, n_layers, kv_groups, **figures)


def test_everything_on_the_fastest_device_when_it_fits():
    pr = tiny([1000, 1000, 1000], [1e9, 3e9, 2e9], n_layers=2)
    for result in (exhaustive(pr), cpsat(pr)):
        assert result.status == "OPTIMAL"
        assert result.decision == Placement((1,) * pr.n_blocks)
        # (2 + 2 + 4) MFLOP per layer at 3 GFLOP/s, two layers
        assert result.objective_seconds == pytest.approx(2 * 8e6 / 3e9)


def test_memory_forces_the_ffn_off_the_fast_device():
    # d1 is fast but holds only 45 B: attention (10 + 10) and proj (20) fit there, ffn (50) does not.
    pr = tiny([1000, 45], [1e9, 4e9], bandwidth=1e9, latency=0.0, ffn_memory_bytes=50)
    for result in (exhaustive(pr), cpsat(pr)):
        assert result.decision == Placement((1, 1, 1, 0))
        # attention 2e6/4e9 + proj 2e6/4e9 + 2000 B at 1 GB/s + ffn 4e6/1e9
        assert result.objective_seconds == pytest.approx(0.0005 + 0.0005 + 2e-6 + 0.004)


def test_heads_split_across_equal_devices_when_links_are_fast():
    # Two equal devices, instant links, heavy attention: running the two heads in parallel wins.
    pr = tiny([1000, 1000], [1e9, 1e9], bandwidth=1e12, latency=0.0, attention_flops=1e8, projection_flops=1e3, ffn_flops=1e3)
    result = exhaustive(pr)
    a, b = result.decision.device_of_block[:2]
    assert a != b
    assert result.objective_seconds == pytest.approx(0.1 + 2e-6, rel=1e-3)
    assert cpsat(pr).objective_seconds == pytest.approx(result.objective_seconds, rel=1e-6)


def test_infeasible_by_total_memory():
    # The blocks need 80 B. d0 = ffn 40 + attention 10, d1 = attention 10 + proj 20: fits exactly.
    pr = tiny([50, 39], [1e9, 1e9])
    assert isinstance(exhaustive(pr).decision, Placement)
    assert isinstance(ResourceAware().place(pr, None), Placement)
    for memory in ([39, 39], [30, 30], [49, 31]):  # ffn fits nowhere; too little in all; no packing
        pr = tiny(memory, [1e9, 1e9])
        for result in (exhaustive(pr), cpsat(pr)):
            assert isinstance(result.decision, Infeasible)
            assert result.status == "INFEASIBLE"
        assert isinstance(ResourceAware().place(pr, None), Infeasible)


def test_migration_cost_keeps_blocks_in_place():
    # Moving to the faster device would save time per token but the interval is one token
    # and moving 40 MB over 1 MB/s takes 40 s: the exact optimum stays.
    pr = tiny([1e9, 1e9], [1e9, 1.1e9], n_layers=1, kv_groups=1,
              attention_memory_bytes=1e7, projection_memory_bytes=2e7, ffn_memory_bytes=4e7)
    previous = Placement((0, 0, 0))
    assert exhaustive(pr, previous).decision == previous
    assert cpsat(pr, previous).decision == previous
    assert exhaustive(pr, None).decision == Placement((1, 1, 1))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    n_devices=st.integers(1, 3),
    kv_groups=st.integers(1, 2),
    memory_use=st.floats(0.3, 1.1),
    headnode=st.booleans(),
    warm=st.booleans(),
)
def test_cpsat_agrees_with_exhaustive(seed, n_devices, kv_groups, memory_use, headnode, warm):
    pr = random_small_problem(seed, n_devices, 2, kv_groups, memory_use, headnode, interval_tokens=2)
    previous = None
    if warm:
        first = exhaustive(pr)
        if isinstance(first.decision, Infeasible):
            return
        previous, pr = first.decision, perturbed(pr, seed)
    ex, cp = exhaustive(pr, previous), cpsat(pr, previous, time_limit_seconds=20)
    assert ex.status == cp.status and cp.status in ("OPTIMAL", "INFEASIBLE")
    assert summary(pr, cp) == summary(pr, ex, approx=True)


def summary(pr, result, approx: bool = False) -> tuple:
    """What two solvers must agree on: feasibility, the optimum, the gap, any memory violation
    (None where there is no placement)."""
    placed = not isinstance(result.decision, Infeasible)
    objective = result.objective_seconds
    if approx and objective is not None:
        objective = pytest.approx(objective, rel=1e-6)
    return (placed, objective, result.gap, bool(costmodel.memory_violations(pr, result.decision)) if placed else None)


def test_exact_reports_status_and_gap_under_a_time_limit():
    """Warm-started from a heuristic's placement (a hint), CP-SAT has a solution at once, so
    under a short limit it reports FEASIBLE with a gap, or OPTIMAL; never worse than the hint."""
    pr = random_small_problem(3, n_devices=5, n_layers=3, kv_groups=3, memory_use=0.7)
    hint = ResourceAware().place(pr, None)
    assert isinstance(hint, Placement)
    result = cpsat(pr, hint, time_limit_seconds=0.2)
    assert result.status in ("OPTIMAL", "FEASIBLE")
    assert 0.0 <= result.gap <= 1.0
    assert result.bound_seconds <= result.objective_seconds * (1 + 1e-6)
    assert result.objective_seconds <= costmodel.objective_seconds(pr, hint, hint) * (1 + 1e-9)


def test_exact_without_a_solution_in_time_reports_unknown_and_no_figures():
    pr = random_small_problem(3, n_devices=5, n_layers=3, kv_groups=3, memory_use=0.7)
    result = cpsat(pr, time_limit_seconds=0.001)
    assert (result.status, result.objective_seconds, result.gap) == ("UNKNOWN", None, None)
    assert isinstance(result.decision, Infeasible) and "within" in result.decision.reason


def test_exact_picks_the_solver_by_size():
    solver = Exact(exhaustive_limit=100)
    small = tiny([1000, 1000], [1e9, 2e9], kv_groups=1)  # 2^3 placements
    solver.place(small, None)
    assert solver.last.status == "OPTIMAL"
    big = random_small_problem(1, 4, 2, 2)
    assert isinstance(solver.place(big, None), Placement)
    with pytest.raises(ValueError):
        exhaustive(big, max_placements=10)
    assert np.isfinite(solver.last.objective_seconds)
