"""Contiguous layer shards by dynamic programming (EdgeShard-style).

Used by the EdgeShard-style and Galaxy-style baselines, and as one of the starting
points of the resource-aware search.
"""

from __future__ import annotations

import numpy as np

from edgeheads.controller.problem import Placement, Problem


def by_compute(problem: Problem) -> np.ndarray:
    """Device indices, fastest (available FLOP/s) first, ties by index."""
    flops = problem.cluster.available_flops_per_second
    return np.lexsort((np.arange(problem.n_devices), -flops))


def layer_blocks(problem: Problem, layer: int) -> np.ndarray:
    """Indices of every block of ``layer``."""
    lay = problem.layout
    return np.concatenate([lay.attention[layer], [lay.projection[layer], lay.ffn[layer]]]).astype(np.int64)


def contiguous_shards(
    unit_bytes: np.ndarray, unit_flops: np.ndarray, capacity_bytes: np.ndarray,
    inverse_flops: np.ndarray, hop_seconds: np.ndarray, start_seconds: np.ndarray, end_seconds: np.ndarray,
) -> list[tuple[int, int, int]] | None:
    """Dynamic programme over (layers placed, last device in a fixed device order).

    Devices are taken in the given order (each used at most once, some skipped); each
    takes a contiguous run of layers that fits its memory. Minimises the sum of shard
    compute (flops * inverse_flops) plus hops between consecutive shards, plus the hop
    in from the source (``start_seconds``) and out to the sink (``end_seconds``).
    Returns [(first_layer, end_layer, device_position)] or None if nothing fits.
    """
    n_layers, n = len(unit_bytes), len(capacity_bytes)
    flops_prefix = np.concatenate([[0.0], np.cumsum(unit_flops)])
    bytes_prefix = np.concatenate([[0.0], np.cumsum(unit_bytes)])
    dp = np.full((n_layers + 1, n), np.inf)
    # into[i][j2]: best cost with i layers placed and the next shard on position j2
    into = np.full((n_layers + 1, n), np.inf)
    into_from = np.full((n_layers + 1, n), -1, dtype=np.int64)
    choice = np.full((n_layers + 1, n), -1, dtype=np.int64)
    into[0] = start_seconds
    earlier = np.tril(np.ones((n, n), dtype=bool), k=-1).T  # earlier[j, j2]: j < j2
    for i2 in range(1, n_layers + 1):
        i = np.arange(i2)
        work = (flops_prefix[i2] - flops_prefix[i])[:, None] * inverse_flops[None, :]  # (i2, n)
        fits = (bytes_prefix[i2] - bytes_prefix[i])[:, None] <= capacity_bytes[None, :]
        cand = np.where(fits, into[:i2] + work, np.inf)
        choice[i2] = np.argmin(cand, axis=0)
        dp[i2] = cand.min(axis=0)
        if i2 < n_layers:
            via = np.where(earlier, dp[i2][:, None] + hop_seconds, np.inf)  # (j, j2)
            into[i2] = via.min(axis=0)
            into_from[i2] = via.argmin(axis=0)
    total = dp[n_layers] + end_seconds
    j = int(np.argmin(total))
    if not np.isfinite(total[j]):
        return None
    shards = []
    i2 = n_layers
    while i2 > 0:
        i = int(choice[i2, j])
        shards.append((i, i2, j))
        j, i2 = int(into_from[i, j]), i
    return shards[::-1]


def layer_chain(problem: Problem) -> Placement | None:
    """Whole layers in contiguous shards on devices taken in descending compute order,
    minimising compute plus hops (the EdgeShard-style plan); None if nothing fits."""
    order = by_compute(problem)
    units = [layer_blocks(problem, layer) for layer in range(problem.layout.n_layers)]
    unit_bytes = np.array([problem.memory_bytes[u].sum() for u in units])
    unit_flops = np.array([problem.flops[u].sum() for u in units])
    mx = problem.residual_message_seconds
    head = problem.headnode
    start = mx[head, order] if head is not None else np.zeros(len(order))
    end = mx[order, head] if head is not None else np.zeros(len(order))
    shards = contiguous_shards(
        unit_bytes, unit_flops, problem.memory_limit_bytes[order], problem.inverse_flops_per_second[order],
        mx[np.ix_(order, order)], start, end,
    )
    if shards is None:
        return None
    assign = np.empty(problem.n_blocks, dtype=np.int64)
    for first, end_layer, position in shards:
        for layer in range(first, end_layer):
            assign[units[layer]] = order[position]
    return Placement.of(assign)
