"""Local search for the resource-aware algorithm: the improvement phase (§IV step 4-5).

All moves are judged on the exact objective, horizon * per-token latency + migration
delay, through ``SearchState``'s incremental rows:

- single-block moves, every device at once (with "don't look" bits per layer);
- whole-layer moves (escape the optimum where moving one block only adds messages);
- swaps of two blocks when memory blocks the better single move;
- for small cold starts, iterated local search with deterministic kicks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edgeheads.controller import costmodel
from edgeheads.controller.incremental import SearchState

if TYPE_CHECKING:
    from edgeheads.controller.resource_aware import ResourceAwareConfig


class OutOfBudget(Exception):
    pass


@dataclass
class Budget:
    config: "ResourceAwareConfig"
    start: float = field(default_factory=time.perf_counter)
    iterations: int = 0

    def spend(self, n: int = 1) -> None:
        self.iterations += n
        if self.iterations > self.config.max_iterations:
            raise OutOfBudget(f"iteration bound {self.config.max_iterations} reached")
        if time.perf_counter() - self.start > self.config.time_limit_seconds:
            raise OutOfBudget(f"time limit {self.config.time_limit_seconds} s reached")


def objective_with_migration(state: SearchState, prev: np.ndarray) -> float:
    """horizon * latency + migration delay from ``prev`` (costmodel.objective_seconds, vectorised)."""
    pr = state.problem
    moved = np.flatnonzero(state.assign != prev)
    src, dst = prev[moved], state.assign[moved]
    migration = pr.migration_latency_seconds[src, dst] + pr.migration_bytes[moved] * pr.inverse_bandwidth[src, dst]
    return pr.horizon_tokens * state.total_seconds() + float(migration.sum())



def improve(
    state: SearchState,
    order: np.ndarray,
    prev: np.ndarray | None,
    frozen: np.ndarray,
    budget: Budget,
    config: "ResourceAwareConfig",
) -> None:
    """Local search on horizon * latency + migration; stops at a local optimum or the budget."""
    pr = state.problem
    horizon = pr.horizon_tokens
    mem = pr.memory_bytes
    mig_rows: dict[int, np.ndarray] = {}
    no_migration = np.zeros(pr.n_devices)

    def migration_row(b: int) -> np.ndarray:
        if prev is None:
            return no_migration
        if b not in mig_rows:
            mig_rows[b] = costmodel.migration_seconds_to_all(pr, b, int(prev[b]))
        return mig_rows[b]

    lay = state.layout
    is_ffn = np.zeros(pr.n_blocks, dtype=bool)
    is_ffn[lay.ffn] = True
    dirty = np.ones(lay.n_layers + 1, dtype=bool)  # "don't look" bits per layer (+1 pad)
    blocked_gain = np.zeros(pr.n_blocks)  # best gain a block could not take for lack of memory
    try:
        for _sweep in range(config.max_sweeps):
            state.touched[:] = False
            improved = False
            threshold = -1e-12 * max(state.total_seconds() * horizon, 1e-30)
            free = state.free_bytes()
            for b in order:
                b = int(b)
                layer = lay.layer_of_block[b]
                if frozen[b] or not (dirty[layer] or (is_ffn[b] and dirty[layer + 1])):
                    continue
                cur = int(state.assign[b])
                row = migration_row(b)
                gain = horizon * state.latency_delta(b) + row - row[cur]
                fits = free >= mem[b]
                fits[cur] = True
                blocked_gain[b] = min(float(np.where(fits, 0.0, gain).min()), 0.0)
                gain = np.where(fits, gain, np.inf)
                j = int(np.argmin(gain))
                if gain[j] < threshold:
                    state.move(b, j)
                    free = state.free_bytes()
                    blocked_gain[b] = 0.0
                    budget.spend()
                    improved = True
                    if prev is not None and j != prev[b]:
                        frozen[b] = True
            look = dirty.copy()
            look[:-1] |= state.touched
            if config.layer_moves and _layer_moves(state, prev, frozen, budget, migration_row, look):
                improved = True
            if not improved and config.swap_moves:  # the costlier neighbourhood, only at a local optimum
                candidates = [int(b) for b in order if blocked_gain[b] < threshold and not frozen[b]]
                improved = _swap_moves(state, candidates, prev, frozen, budget, migration_row, config)
            if not improved:
                return
            dirty[:-1] = state.touched
    except OutOfBudget:
        return


def _layer_moves(state, prev, frozen, budget, migration_row, look: np.ndarray) -> bool:
    """Move all blocks of a layer onto one device (escapes single-move local optima:
    moving one block of a co-located layer alone only adds messages)."""
    pr, lay = state.problem, state.layout
    horizon = pr.horizon_tokens
    improved = False
    for layer in range(lay.n_layers):
        if not (look[layer] or look[layer + 1]):  # nothing this move depends on has changed
            continue
        blocks = np.concatenate([lay.attention[layer], [lay.projection[layer], lay.ffn[layer]]])
        if frozen[blocks].any():
            continue
        origin = state.assign[blocks].copy()
        here = np.bincount(origin, weights=pr.memory_bytes[blocks], minlength=pr.n_devices)
        fits = state.free_bytes() + here >= float(pr.memory_bytes[blocks].sum())
        gain = horizon * state.layer_delta(layer)
        if prev is not None:
            gain = gain + sum(migration_row(int(b)) - migration_row(int(b))[o] for b, o in zip(blocks, origin))
        gain = np.where(fits, gain, np.inf)
        d = int(np.argmin(gain))
        if gain[d] < -1e-12 * max(horizon * state.total_seconds(), 1e-30) and not np.all(origin == d):
            for b in blocks:
                state.move(int(b), d)
            budget.spend(len(blocks))
            improved = True
            if prev is not None:
                frozen[blocks[prev[blocks] != d]] = True
    return improved


def _swap_moves(state, candidates, prev, frozen, budget, migration_row, config: "ResourceAwareConfig") -> bool:
    """Exchange two blocks when memory blocks the better single move (tight devices).
    ``candidates``: blocks whose best single move was blocked by memory in the last sweep."""
    pr = state.problem
    horizon = pr.horizon_tokens
    mem = pr.memory_bytes
    targets = config.swap_targets
    pairs_left = config.max_swap_pairs
    improved = False
    for b in candidates:
        if frozen[b]:
            continue
        cur = int(state.assign[b])
        row = migration_row(b)
        gain = horizon * state.latency_delta(b) + row - row[cur]
        free = state.free_bytes()
        blocked = (free < mem[b]) & (gain < 0)
        blocked[cur] = False
        if not blocked.any():
            continue
        devices = [int(j) for j in np.argsort(np.where(blocked, gain, np.inf), kind="stable")[:targets] if blocked[j]]
        base = horizon * state.total_seconds() + row[cur]
        best = (0.0, -1, -1)
        for j in devices:
            partners = [
                int(r)
                for r in np.flatnonzero(state.assign == j)
                if not frozen[r]
                and free[j] + mem[r] >= mem[b]
                and free[cur] + mem[b] >= mem[r]
            ]
            for r in sorted(partners, key=lambda r: (abs(mem[r] - mem[b]), r))[:targets]:
                pairs_left -= 1
                r_row = migration_row(r)
                before = base + r_row[j]
                state.move(b, j)
                state.move(r, cur)
                after = horizon * state.total_seconds() + row[j] + r_row[cur]
                state.move(r, j)
                state.move(b, cur)
                if after - before < best[0] - 1e-12 * max(before, 1e-30):
                    best = (after - before, j, r)
        if pairs_left <= 0 and best[1] < 0:
            break
        if best[1] >= 0:
            _, j, r = best
            state.move(b, j)
            state.move(r, cur)
            budget.spend(2)
            improved = True
            if prev is not None:
                frozen[b] = j != prev[b]
                frozen[r] = cur != prev[r]
    return improved


def kick(best: SearchState, order: np.ndarray, budget: Budget, config: "ResourceAwareConfig") -> SearchState:
    """Iterated local search for small cold starts: try every kick (see
    ResourceAwareConfig.kick_max_size) from the best placement, re-run the local search, keep improvements,
    and start over until a full round finds nothing (or the budget ends)."""
    pr, lay = best.problem, best.layout
    layers = [np.flatnonzero(lay.layer_of_block == layer) for layer in range(lay.n_layers)]
    no_freeze = np.zeros(pr.n_blocks, dtype=bool)
    improved = True
    while improved:
        improved = False
        kicks: list[np.ndarray] = []
        for layer, blocks in enumerate(layers):
            groups = [blocks] + [blocks[best.assign[blocks] == i] for i in np.unique(best.assign[blocks])]
            for group in groups if len(groups) > 2 else groups[:1]:
                for d in range(pr.n_devices):
                    if np.any(best.assign[group] != d):
                        kick = best.assign.copy()
                        kick[group] = d
                        kicks.append(kick)
            for other in range(layer + 1, lay.n_layers):
                if len(layers[other]) == len(blocks) and np.any(best.assign[blocks] != best.assign[layers[other]]):
                    kick = best.assign.copy()
                    kick[blocks], kick[layers[other]] = best.assign[layers[other]], best.assign[blocks]
                    kicks.append(kick)
        for kick in kicks:
            used = np.bincount(kick, weights=pr.memory_bytes, minlength=pr.n_devices)
            if np.any(used > pr.memory_limit_bytes):
                continue
            budget.spend()
            state = SearchState(pr, kick)
            improve(state, order, None, no_freeze.copy(), budget, config)
            if state.total_seconds() < best.total_seconds() * (1 - 1e-9):
                best, improved = state, True
                break
    return best
