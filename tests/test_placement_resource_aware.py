"""Resource-aware: determinism, warm starts, hysteresis, overload handling, limits."""

import numpy as np
import pytest

from edgeheads.controller import costmodel
from edgeheads.controller.instances import model_problem, perturbed, random_small_problem
from edgeheads.controller.problem import Cluster, Infeasible, Placement, Problem
from edgeheads.controller.resource_aware import ResourceAware, ResourceAwareConfig, demand_order
from edgeheads.common.spec import SMOLLM2_135M


def test_demand_order_puts_heavy_blocks_first():
    pr = random_small_problem(0, 3, 2, 2)
    order = demand_order(pr)
    kinds = [pr.blocks[b].kind.value for b in order]
    assert kinds[:2] == ["ffn", "ffn"]


def test_deterministic():
    pr = model_problem(SMOLLM2_135M, 10, seed=4)
    first = ResourceAware().place(pr, None)
    assert all(ResourceAware().place(pr, None) == first for _ in range(3))
    nxt = perturbed(pr, 1)
    assert ResourceAware().place(nxt, first) == ResourceAware().place(nxt, first)


def test_hysteresis_ignores_telemetry_noise():
    pr = model_problem(SMOLLM2_135M, 8, seed=2)
    placement = ResourceAware().place(pr, None)
    assert isinstance(placement, Placement)
    for seed in range(5):
        noisy = perturbed(pr, seed, compute_noise=0.01)  # 1% jitter in available compute
        assert ResourceAware().place(noisy, placement) == placement


def test_warm_start_moves_work_off_a_loaded_device_when_it_pays():
    pr = model_problem(SMOLLM2_135M, 8, seed=2)
    placement = ResourceAware().place(pr, None)
    busiest = int(np.bincount(placement.array(), minlength=pr.n_devices).argmax())
    c = pr.cluster
    flops = c.available_flops_per_second.copy()
    flops[busiest] *= 0.05  # a background job takes 95% of that device
    loaded = Problem(
        Cluster(c.names, c.memory_bytes, c.peak_flops_per_second, flops, c.bandwidth_bytes_per_second, c.latency_seconds),
        pr.blocks, pr.memory_bytes, pr.memory_bytes, pr.flops, pr.output_bytes, pr.residual_bytes,
        interval_tokens=1, horizon_tokens=1000, headnode=pr.headnode,
    )
    moved = ResourceAware().place(loaded, placement)
    assert isinstance(moved, Placement) and moved != placement
    stay = costmodel.objective_seconds(loaded, placement, placement)
    assert costmodel.objective_seconds(loaded, moved, placement) < stay
    # with a one-token horizon the same migration does not pay: the paper's myopic objective
    myopic = Problem(
        loaded.cluster, pr.blocks, pr.memory_bytes, pr.memory_bytes * 1e3, pr.flops, pr.output_bytes,
        pr.residual_bytes, interval_tokens=1, horizon_tokens=1, headnode=pr.headnode,
    )
    assert ResourceAware().place(myopic, placement) == placement


def test_warm_start_repairs_memory_violations():
    pr = random_small_problem(5, n_devices=4, n_layers=2, kv_groups=3, memory_use=0.5)
    first = ResourceAware().place(pr, None)
    grown = perturbed(pr, 0, compute_noise=0.0, memory_scale=1.6)  # K/V growth: 80% of all memory
    assert costmodel.memory_violations(grown, first)
    repaired = ResourceAware().place(grown, first)
    assert isinstance(repaired, Placement)
    assert not costmodel.memory_violations(grown, repaired)
    moved = [b for b in range(pr.n_blocks) if repaired.device_of_block[b] != first.device_of_block[b]]
    assert 0 < len(moved) < pr.n_blocks


def test_overload_resolution_and_backtracking_find_the_only_packing():
    # a: 30 B (fast), b and c: 20 B. Blocks: ffn 20, proj 20, two attention blocks of 15: the
    # only packing is a = both heads, b and c = ffn and proj. The first pass puts ffn on the
    # fast device and then cannot place the second head anywhere: ResolveResourceOverload and
    # backtracking have to move blocks that are already placed.
    from edgeheads.controller.problem import Device, uniform_problem
    devices = [Device("a", 30, 4e9, 4e9), Device("b", 20, 1e9, 1e9), Device("c", 20, 1e9, 1e9)]
    pr = uniform_problem(Cluster.from_devices(devices, 1e6, 0.001), 1, 2,
                         attention_memory_bytes=15, projection_memory_bytes=20, ffn_memory_bytes=20,
                         attention_flops=1e6, projection_flops=1e6, ffn_flops=4e6, attention_output_bytes=100,
                         residual_bytes=100)
    placement = ResourceAware().place(pr, None)
    assert isinstance(placement, Placement)
    assert placement.device_of_block[:2] == (0, 0)
    assert list(costmodel.device_memory_bytes(pr, placement)) == [30.0, 20.0, 20.0]


def test_iteration_bound_and_time_limit_end_in_infeasible():
    pr = model_problem(SMOLLM2_135M, 10, seed=1)
    tight = ResourceAware(ResourceAwareConfig(max_iterations=5))
    result = tight.place(pr, None)
    assert isinstance(result, Infeasible) and "iteration bound" in result.reason
    slow = ResourceAware(ResourceAwareConfig(time_limit_seconds=0.0))
    result = slow.place(pr, None)
    assert isinstance(result, Infeasible) and "time limit" in result.reason


def test_infeasible_reasons_are_specific():
    pr = random_small_problem(1, 3, 2, 2, memory_use=1.2)
    result = ResourceAware().place(pr, None)
    assert isinstance(result, Infeasible) and "in all" in result.reason


@pytest.mark.parametrize("n_devices", [1, 2, 25])
def test_real_model_placements_fit(n_devices):
    pr = model_problem(SMOLLM2_135M, n_devices, seed=n_devices)
    placement = ResourceAware().place(pr, None)
    assert isinstance(placement, Placement)
    assert not costmodel.memory_violations(pr, placement)
