"""The incremental engine used by the search computes exactly the reference cost model."""

import numpy as np
from hypothesis import given, settings, strategies as st

from edgeheads.controller import costmodel
from edgeheads.controller.incremental import SearchState
from edgeheads.controller.instances import random_placement, random_small_problem
from edgeheads.controller.problem import Placement


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_devices=st.integers(1, 5),
    n_layers=st.integers(1, 3),
    kv_groups=st.integers(1, 3),
    headnode=st.booleans(),
)
def test_latency_delta_matches_reference(seed, n_devices, n_layers, kv_groups, headnode):
    pr = random_small_problem(seed, n_devices, n_layers, kv_groups, headnode=headnode)
    state = SearchState(pr, random_placement(pr, seed).array())
    base = costmodel.token_latency_seconds(pr, Placement.of(state.assign))
    assert abs(state.total_seconds() - base) <= 1e-12 * max(base, 1)
    for b in range(pr.n_blocks):
        delta = state.latency_delta(b)
        for d in range(n_devices):
            moved = state.assign.copy()
            moved[b] = d
            expect = costmodel.token_latency_seconds(pr, Placement.of(moved)) - base
            assert abs(delta[d] - expect) <= 1e-9 * max(base, 1), (b, d)
    for layer in range(n_layers):
        delta = state.layer_delta(layer)
        for d in range(n_devices):
            moved = state.assign.copy()
            moved[pr.layout.layer_of_block == layer] = d
            expect = costmodel.token_latency_seconds(pr, Placement.of(moved)) - base
            assert abs(delta[d] - expect) <= 1e-9 * max(base, 1), (layer, d)


def test_moves_keep_cached_sums_exact():
    pr = random_small_problem(7, 4, 3, 3, headnode=True)
    rng = np.random.default_rng(0)
    state = SearchState(pr, random_placement(pr, 1).array())
    for _ in range(200):
        state.move(int(rng.integers(pr.n_blocks)), int(rng.integers(pr.n_devices)))
        placement = Placement.of(state.assign)
        assert np.isclose(state.total_seconds(), costmodel.token_latency_seconds(pr, placement), rtol=1e-12)
        assert np.allclose(state.used_bytes, costmodel.device_memory_bytes(pr, placement))
