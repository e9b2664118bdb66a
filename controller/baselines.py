"""Baselines from the paper's §V-A, all with the interface (problem, previous) -> decision.

- greedy: first-fit decreasing by memory, devices by available compute; fresh every
  interval, blind to latency and migration.
- block-round-robin: blocks in execution order dealt to devices cyclically (skipping full ones);
  the paper's round-robin, named apart from the runtime's ``round-robin`` policy (spread.py).
- static: the resource-aware placement of the first interval, never moved.
- dynamic-layer: re-placed every interval like resource-aware, but a whole layer is one unit.
- edgeshard: contiguous layer shards on devices, by dynamic programming; static.
- galaxy: a pipeline of layer shards, each on a group of devices that splits the layers'
  attention groups (head parallelism) and spreads their FFNs; static.

Static baselines return the previous placement unchanged, even when it no longer fits
in memory: the simulator then charges the overflow (see simulator.py).
"""

from __future__ import annotations

import numpy as np

from edgeheads.controller import costmodel
from edgeheads.controller.incremental import SearchState
from edgeheads.controller.problem import Decision, Infeasible, Placement, Problem
from edgeheads.controller.resource_aware import ResourceAware, ResourceAwareConfig, jumps


from edgeheads.controller.sharding import by_compute as _by_compute
from edgeheads.controller.sharding import contiguous_shards, layer_blocks as _layer_blocks, layer_chain


class Greedy:
    name = "greedy"

    def place(self, problem: Problem, previous: Placement | None) -> Decision:
        free = problem.memory_limit_bytes.copy()
        devices = _by_compute(problem)
        assign = np.full(problem.n_blocks, -1, dtype=np.int64)
        for b in np.lexsort((np.arange(problem.n_blocks), -problem.memory_bytes)):
            for d in devices:
                if free[d] >= problem.memory_bytes[b]:
                    assign[b] = d
                    free[d] -= problem.memory_bytes[b]
                    break
            else:
                return Infeasible(f"greedy: no device has room for {problem.blocks[b]}")
        return Placement.of(assign)


class BlockRoundRobin:
    """Block b to device b mod n, the next with room if that one is full. Not the runtime's
    ``round-robin`` policy (controller/spread.py), which deals only KV groups, per layer."""

    name = "block-round-robin"

    def place(self, problem: Problem, previous: Placement | None) -> Decision:
        n = problem.n_devices
        free = problem.memory_limit_bytes.copy()
        assign = np.full(problem.n_blocks, -1, dtype=np.int64)
        for b in range(problem.n_blocks):
            for step in range(n):
                d = (b + step) % n
                if free[d] >= problem.memory_bytes[b]:
                    assign[b] = d
                    free[d] -= problem.memory_bytes[b]
                    break
            else:
                return Infeasible(f"block-round-robin: no device has room for {problem.blocks[b]}")
        return Placement.of(assign)


class Static:
    """One resource-aware placement at the first interval; never migrates."""

    name = "static"

    def __init__(self, config: ResourceAwareConfig | None = None) -> None:
        self.first = ResourceAware(config)

    def place(self, problem: Problem, previous: Placement | None) -> Decision:
        if previous is not None:
            return previous
        return self.first.place(problem, None)


class DynamicLayer:
    """Resource-aware at layer granularity: a layer's blocks always share one device."""

    name = "dynamic-layer"

    def __init__(self, hysteresis_fraction: float = 0.02, max_sweeps: int = 30) -> None:
        self.hysteresis_fraction = hysteresis_fraction
        self.max_sweeps = max_sweeps

    def place(self, problem: Problem, previous: Placement | None) -> Decision:
        lay = problem.layout
        n_layers = lay.n_layers
        units = [_layer_blocks(problem, layer) for layer in range(n_layers)]
        unit_bytes = np.array([problem.memory_bytes[u].sum() for u in units])
        unit_flops = np.array([problem.flops[u].sum() for u in units])
        cap = problem.memory_limit_bytes
        inv, mx = problem.inverse_flops_per_second, problem.residual_message_seconds
        head = problem.headnode
        layer_dev = np.full(n_layers, -1, dtype=np.int64)
        prev_dev = None
        if previous is not None and len(previous.device_of_block) == problem.n_blocks:
            prev_dev = previous.array()[lay.ffn]
            layer_dev = prev_dev.copy()
        # repair: evict layers from overloaded devices (cheapest to move first)
        used = np.zeros(problem.n_devices)
        for layer in range(n_layers):
            if layer_dev[layer] >= 0:
                used[layer_dev[layer]] += unit_bytes[layer]
        for layer in sorted(range(n_layers), key=lambda l: (unit_bytes[l], l)):
            d = layer_dev[layer]
            if d >= 0 and used[d] > cap[d]:
                used[d] -= unit_bytes[layer]
                layer_dev[layer] = -1
        for layer in range(n_layers):
            if layer_dev[layer] >= 0:
                continue
            src = layer_dev[layer - 1] if layer > 0 else (-1 if head is None else head)
            score = unit_flops[layer] * inv + (mx[src] if src >= 0 else 0.0)
            fits = cap - used >= unit_bytes[layer]
            if not fits.any():
                return Infeasible(f"dynamic-layer: no device has room for layer {layer}")
            d = int(np.argmin(np.where(fits, score, np.inf)))
            layer_dev[layer] = d
            used[d] += unit_bytes[layer]
        stay = self._expand(problem, layer_dev)
        state = SearchState(problem, stay.array())
        moved = np.zeros(n_layers, dtype=bool)
        horizon = problem.horizon_tokens
        for _sweep in range(self.max_sweeps):
            improved = False
            for layer in range(n_layers):
                if moved[layer] and prev_dev is not None:
                    continue
                blocks = units[layer]
                here = np.bincount(state.assign[blocks], weights=problem.memory_bytes[blocks], minlength=problem.n_devices)
                fits = state.free_bytes() + here >= unit_bytes[layer]
                gain = horizon * state.layer_delta(layer)
                if prev_dev is not None:
                    row = sum(costmodel.migration_seconds_to_all(problem, int(b), int(prev_dev[layer])) for b in blocks)
                    gain = gain + row - row[state.assign[blocks[0]]]
                gain = np.where(fits, gain, np.inf)
                d = int(np.argmin(gain))
                if gain[d] < -1e-12 * horizon * state.total_seconds() and d != state.assign[blocks[0]]:
                    for b in blocks:
                        state.move(int(b), d)
                    moved[layer] = True
                    improved = True
            if not improved:
                break
        new = Placement.of(state.assign)
        if previous is not None and prev_dev is not None:
            # a warm start also weighs resource-aware's jumps (the whole model on one device, the
            # layer chain), both whole layers: one layer moved at a time adds two messages, and
            # with a costly message no single step pays (on the testbed it kept the model on a
            # hogged board for 400 tokens)
            best, best_objective = new, costmodel.objective_seconds(problem, new, previous)
            for jump in jumps(problem):
                candidate = Placement.of(jump)
                objective = costmodel.objective_seconds(problem, candidate, previous)
                if objective < best_objective * (1 - 1e-12):
                    best, best_objective = candidate, objective
            if best_objective >= costmodel.objective_seconds(problem, stay, previous) * (1 - self.hysteresis_fraction):
                return stay
            return best
        return new

    @staticmethod
    def _expand(problem: Problem, layer_dev: np.ndarray) -> Placement:
        return Placement.of(layer_dev[problem.layout.layer_of_block])


class EdgeShard:
    """EdgeShard-style: contiguous layer shards, devices in descending compute order, by DP; static."""

    name = "edgeshard"

    def place(self, problem: Problem, previous: Placement | None) -> Decision:
        if previous is not None:
            return previous
        placement = layer_chain(problem)
        if placement is None:
            return Infeasible("edgeshard: no contiguous layer sharding fits in memory")
        return placement


class Galaxy:
    """Galaxy-style: pipeline shards over groups of devices; inside a shard each layer's
    attention groups are split across the group's devices in proportion to their compute
    (head parallelism) and the FFNs are spread over the group. Static. Our blocks cannot
    split one FFN matrix, so Galaxy's FFN tensor parallelism is approximated by spreading
    the shard's FFN blocks (docs/placement.md)."""

    name = "galaxy"

    def __init__(self, group_sizes: tuple[int, ...] = (2, 3, 4)) -> None:
        self.group_sizes = group_sizes

    def place(self, problem: Problem, previous: Placement | None) -> Decision:
        if previous is not None:
            return previous
        best: tuple[float, Placement] | None = None
        for size in self.group_sizes:
            placement = self._with_groups(problem, min(size, problem.n_devices))
            if placement is None:
                continue
            value = costmodel.token_latency_seconds(problem, placement)
            if best is None or value < best[0]:
                best = (value, placement)
        if best is None:
            return Infeasible("galaxy: no grouping of devices fits the model in memory")
        return best[1]

    def _with_groups(self, problem: Problem, size: int) -> Placement | None:
        order = _by_compute(problem)
        groups = [order[i : i + size] for i in range(0, len(order), size)]
        cap = problem.memory_limit_bytes
        flops = problem.cluster.available_flops_per_second
        n_layers = problem.layout.n_layers
        units = [_layer_blocks(problem, layer) for layer in range(n_layers)]
        unit_bytes = np.array([problem.memory_bytes[u].sum() for u in units])
        unit_flops = np.array([problem.flops[u].sum() for u in units])
        mx = problem.residual_message_seconds
        group_cap = np.array([cap[g].sum() * 0.95 for g in groups])  # leave room for packing
        group_inv = np.array([1.0 / flops[g].sum() for g in groups])
        hop = np.array([[mx[a[0], b[0]] for b in groups] for a in groups])
        head = problem.headnode
        start = np.array([mx[head, g[0]] if head is not None else 0.0 for g in groups])
        end = np.array([mx[g[0], head] if head is not None else 0.0 for g in groups])
        # the DP sees each group as one device with the group's memory and compute
        shards = contiguous_shards(unit_bytes, unit_flops, group_cap, group_inv, hop, start, end)
        if shards is None:
            return None
        assign = np.full(problem.n_blocks, -1, dtype=np.int64)
        free = cap.astype(float).copy()
        lay = problem.layout
        for first, end_layer, position in shards:
            group = groups[position]
            share = flops[group] / flops[group].sum()
            busy = np.zeros(len(group))
            for layer in range(first, end_layer):
                attn = lay.attention[layer]
                quota = _largest_remainder(share, len(attn))
                slots = [int(d) for d, q in zip(group, quota) for _ in range(q)]
                for b, d in zip(attn, slots):
                    assign[b] = self._fit(problem, int(b), d, group, free)
                    if assign[b] < 0:
                        return None
                for b in (lay.projection[layer], lay.ffn[layer]):
                    d = int(group[int(np.argmin(busy + problem.flops[b] / flops[group]))])
                    assign[b] = self._fit(problem, int(b), d, group, free)
                    if assign[b] < 0:
                        return None
                    where = np.flatnonzero(group == assign[b])
                    if where.size:
                        busy[where[0]] += problem.flops[b] / flops[assign[b]]
        return Placement.of(assign)

    @staticmethod
    def _fit(problem: Problem, b: int, preferred: int, group: np.ndarray, free: np.ndarray) -> int:
        """``preferred`` if it has room, else another group device, else any device; -1 if none."""
        need = problem.memory_bytes[b]
        for d in [preferred, *[int(g) for g in group], *range(problem.n_devices)]:
            if free[d] >= need:
                free[d] -= need
                return d
        return -1


def _largest_remainder(share: np.ndarray, total: int) -> list[int]:
    raw = share * total
    quota = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - quota), kind="stable")[: total - quota.sum()]:
        quota[i] += 1
    return [int(q) for q in quota]
