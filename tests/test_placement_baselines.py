"""Baselines do what their names say."""

import itertools

import numpy as np
import pytest

from edgeheads.controller import costmodel
from edgeheads.controller.baselines import BlockRoundRobin, DynamicLayer, EdgeShard, Galaxy, Greedy, Static
from edgeheads.controller.instances import model_problem, perturbed, random_small_problem
from edgeheads.controller.problem import Placement
from edgeheads.controller.resource_aware import ResourceAware
from edgeheads.controller.sharding import by_compute, layer_chain
from edgeheads.common.spec import LLAMA2_7B, SMOLLM2_135M


def layer_devices(pr, placement):
    """Device of each layer, asserting that a layer's blocks share one device."""
    out = []
    for layer in range(pr.layout.n_layers):
        devices = {placement.device_of_block[b] for b in np.flatnonzero(pr.layout.layer_of_block == layer)}
        assert len(devices) == 1, f"layer {layer} is split over {devices}"
        out.append(devices.pop())
    return out


def test_block_round_robin_deals_blocks_in_order():
    pr = random_small_problem(0, 3, 2, 2, memory_use=0.2)
    assert BlockRoundRobin().place(pr, None).device_of_block == tuple(b % 3 for b in range(pr.n_blocks))


def test_greedy_fills_the_fastest_device_first():
    pr = random_small_problem(0, 3, 2, 2, memory_use=0.1)
    fastest = int(by_compute(pr)[0])
    assert pr.cluster.memory_bytes[fastest] >= pr.memory_bytes.sum(), "premise: the whole model fits on it"
    assert set(Greedy().place(pr, None).device_of_block) == {fastest}


def test_static_and_edgeshard_and_galaxy_never_move():
    pr = model_problem(SMOLLM2_135M, 6, seed=3)
    for algorithm in (Static(), EdgeShard(), Galaxy()):
        first = algorithm.place(pr, None)
        assert isinstance(first, Placement)
        assert algorithm.place(perturbed(pr, 1, compute_noise=0.9), first) is first


def test_edgeshard_is_contiguous_and_optimal_among_chains():
    pr = random_small_problem(11, n_devices=3, n_layers=3, kv_groups=1, memory_use=0.5)
    placement = EdgeShard().place(pr, None)
    devices = layer_devices(pr, placement)
    # contiguous: once a device's shard ends it never reappears
    runs = [d for d, _ in itertools.groupby(devices)]
    assert len(runs) == len(set(runs))
    # the DP is optimal among contiguous shardings over devices in descending compute order
    order = list(by_compute(pr))
    best = np.inf
    for layers_to_dev in itertools.product(range(3), repeat=3):
        runs = [d for d, _ in itertools.groupby(layers_to_dev)]
        if len(runs) != len(set(runs)) or [order.index(d) for d in runs] != sorted(order.index(d) for d in runs):
            continue
        candidate = Placement.of(np.array(layers_to_dev)[pr.layout.layer_of_block])
        if not costmodel.memory_violations(pr, candidate):
            best = min(best, costmodel.token_latency_seconds(pr, candidate))
    assert costmodel.token_latency_seconds(pr, placement) == pytest.approx(best)


def test_dynamic_layer_keeps_layers_whole():
    pr = model_problem(SMOLLM2_135M, 6, seed=5)
    first = DynamicLayer().place(pr, None)
    layer_devices(pr, first)
    second = DynamicLayer().place(perturbed(pr, 2, compute_noise=0.8), first)
    layer_devices(pr, second)


def test_galaxy_splits_attention_inside_a_group():
    pr = model_problem(LLAMA2_7B, 12, seed=1)
    placement = Galaxy().place(pr, None)
    assert isinstance(placement, Placement)
    assert not costmodel.memory_violations(pr, placement)
    split = [
        len({placement.device_of_block[b] for b in pr.layout.attention[layer]}) > 1
        for layer in range(pr.layout.n_layers)
    ]
    assert any(split)


def test_resource_aware_no_worse_than_the_layer_chain_it_starts_from():
    for seed in range(3):
        pr = model_problem(LLAMA2_7B, 25, seed=seed)
        chain = layer_chain(pr)
        placement = ResourceAware().place(pr, None)
        assert costmodel.token_latency_seconds(pr, placement) <= costmodel.token_latency_seconds(pr, chain) * (1 + 1e-9)


def test_dynamic_layer_jumps_off_a_slow_device_when_no_single_layer_move_pays():
    from edgeheads.controller.live import LiveWorker, live_problem

    # "a" holds the whole model and is slow now; "b" is 20x faster; every message costs 40 ms
    workers = [LiveWorker("a", 4 << 30, 5e8), LiveWorker("b", 4 << 30, 1e10)]
    pr = live_problem(SMOLLM2_135M, workers, 128, latency_seconds=0.04, horizon_tokens=400)
    on_a = Placement.of(np.zeros(pr.n_blocks, dtype=np.int64))
    on_b = Placement.of(np.ones(pr.n_blocks, dtype=np.int64))
    # one layer onto b: its two new messages cost more than the layer's compute saves
    one = on_a.array().copy()
    one[pr.layout.layer_of_block == 3] = 1
    assert costmodel.token_latency_seconds(pr, Placement.of(one)) > costmodel.token_latency_seconds(pr, on_a)
    # the whole model on b pays its migration many times over the horizon
    assert costmodel.objective_seconds(pr, on_b, on_a) < costmodel.objective_seconds(pr, on_a, on_a) / 2
    assert DynamicLayer().place(pr, on_a).device_of_block == on_b.device_of_block
