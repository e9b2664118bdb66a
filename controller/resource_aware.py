"""The paper's resource-aware algorithm (§IV, Algorithm 1), in full.

Steps, as in the paper, with the choices it leaves open made concrete (docs/placement.md):

1. Quick infeasibility checks (total memory, a block larger than every device).
2. Blocks sorted by descending demand (memory share + compute share), ties by index.
3. Cold start: each block goes to the *lowest-scoring feasible device*. The score is in
   seconds: horizon * (compute time, including same-layer attention already there,
   + messages to and from the neighbours placed so far) + migration delay.
   Warm start: begin from the previous placement; BacktrackForResourceViolations
   evicts, from each overloaded device, the smallest set of blocks that frees enough
   memory and re-places them.
4. A block with no device that has room triggers ResolveResourceOverload: relocate one
   (else a few) already-placed blocks from a candidate device to make room.
5. Improvement (controller/local_search.py): local search on the exact objective
   (horizon * latency + migration): single-block moves evaluated for all devices at
   once, whole-layer moves, and swaps where memory blocks a better move. Cold starts
   also start from the contiguous layer-shard plan (sharding.layer_chain) and keep the
   better result; small cold starts add deterministic kicks (iterated local search).
   Warm starts also weigh two jumps no chain of single moves reaches when every step alone
   adds messages: the whole model on one device (each device it fits on), and the layer-shard
   plan; the best of those and the local search's result stands.
6. Termination: an iteration bound and a time limit. Running out during steps 3-4
   returns Infeasible; during step 5 it returns the best placement found so far.
7. At most one migration per block per interval: in a warm start a block that moved
   is frozen for the rest of the decision. Hysteresis: a warm decision is kept only if
   it beats staying (the previous placement, repaired) by ``hysteresis_fraction``.

Deterministic: no randomness, ties broken by index; with the default limits the
iteration bound and convergence, not the clock, end the search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeheads.controller import costmodel
from edgeheads.controller.incremental import SearchState
from edgeheads.controller.local_search import Budget, OutOfBudget, improve, kick, objective_with_migration
from edgeheads.controller.problem import Decision, Infeasible, Placement, Problem
from edgeheads.controller.sharding import layer_chain
from edgeheads.common.spec import BlockKind


@dataclass(frozen=True)
class ResourceAwareConfig:
    time_limit_seconds: float = 5.0
    max_iterations: int = 100_000
    """Bound on block relocations (placements, evictions, overload moves, improving moves)."""
    max_sweeps: int = 30
    hysteresis_fraction: float = 0.02
    layer_moves: bool = True
    swap_moves: bool = True
    swap_targets: int = 3
    """Devices tried per block for a swap: the best ones its single move could not use for lack of memory."""
    layer_chain_start: bool = True
    """Also start the search from the contiguous layer-shard plan (sharding.layer_chain)."""
    multi_start_max_size: int = 2_000
    """Cold starts with blocks x devices up to this improve every start (demand order, layer
    chain, execution order) and keep the best; larger ones improve only the best start."""
    kick_max_size: int = 200
    """Cold starts with blocks x devices up to this: iterated local search with deterministic
    kicks (a whole layer, or the blocks of a layer that share a device, to another device;
    or two layers exchanging devices), each followed by the local search."""
    max_swap_pairs: int = 400
    """Bound on swap pairs tried per pass (the swap neighbourhood is quadratic)."""


def demand_order(problem: Problem) -> np.ndarray:
    """Block indices by descending memory share + compute share (Algorithm 1, line 4)."""
    mem = problem.memory_bytes / max(float(problem.memory_bytes.sum()), 1e-30)
    flops = problem.flops / max(float(problem.flops.sum()), 1e-30)
    return np.lexsort((np.arange(problem.n_blocks), -(mem + flops)))


class _Builder:
    """A partial placement (-1 = not placed) with the sums the score needs."""

    def __init__(self, problem: Problem, assign: np.ndarray, previous: np.ndarray | None, budget: Budget) -> None:
        self.pr = problem
        self.lay = problem.layout
        self.assign = assign.copy()
        self.previous = previous
        self.budget = budget
        self.frozen = np.zeros(problem.n_blocks, dtype=bool)
        self.is_attention = np.array([k is BlockKind.ATTENTION for k in self.lay.kind_of_block])
        n, L = problem.n_devices, self.lay.n_layers
        self.used = np.zeros(n)
        self.attn_flops = np.zeros((L, n))
        self.attn_out = np.zeros((L, n))
        for b in np.flatnonzero(self.assign >= 0):
            self._account(int(b), int(self.assign[b]), +1)

    def _account(self, b: int, d: int, sign: int) -> None:
        self.used[d] += sign * self.pr.memory_bytes[b]
        if self.is_attention[b]:
            layer = self.lay.layer_of_block[b]
            self.attn_flops[layer, d] += sign * self.pr.flops[b]
            self.attn_out[layer, d] += sign * self.pr.output_bytes[b]

    def put(self, b: int, d: int) -> None:
        if self.assign[b] >= 0:
            self._account(b, int(self.assign[b]), -1)
        self.assign[b] = d
        self._account(b, d, +1)
        if self.previous is not None and d != self.previous[b]:
            self.frozen[b] = True
        self.budget.spend()

    def remove(self, b: int) -> None:
        self._account(b, int(self.assign[b]), -1)
        self.assign[b] = -1

    def free(self) -> np.ndarray:
        return self.pr.memory_limit_bytes - self.used

    def score(self, b: int) -> np.ndarray:
        """(n,) seconds: horizon * (compute + messages to placed neighbours) + migration."""
        pr, lay, a = self.pr, self.lay, self.assign
        inv, mx = pr.inverse_flops_per_second, pr.residual_message_seconds
        layer = int(lay.layer_of_block[b])
        head = -1 if pr.headnode is None else pr.headnode
        source = int(a[lay.ffn[layer - 1]]) if layer > 0 else head
        comm = np.zeros(pr.n_devices)
        if b == lay.projection[layer]:
            compute = pr.flops[b] * inv
            if source >= 0:
                comm += mx[source]
            hosts = np.flatnonzero(self.attn_out[layer] > 0)
            if hosts.size:
                send = pr.link_latency_seconds[hosts] + self.attn_out[layer, hosts][:, None] * pr.inverse_bandwidth[hosts]
                comm += send.max(axis=0)
            f = int(a[lay.ffn[layer]])
            if f >= 0:
                comm += mx[:, f]
        elif b == lay.ffn[layer]:
            compute = pr.flops[b] * inv
            p = int(a[lay.projection[layer]])
            if p >= 0:
                comm += mx[p]
            if layer + 1 < lay.n_layers:
                nxt = [int(a[x]) for x in lay.attention[layer + 1]] + [int(a[lay.projection[layer + 1]])]
                nxt = sorted({d for d in nxt if d >= 0})
                if nxt:
                    comm += mx[:, nxt].max(axis=1)
            elif head >= 0:
                comm += mx[:, head]
        else:
            compute = (self.attn_flops[layer] + pr.flops[b]) * inv
            if source >= 0:
                comm += mx[source]
            p = int(a[lay.projection[layer]])
            if p >= 0:
                comm += pr.link_latency_seconds[:, p] + (self.attn_out[layer] + pr.output_bytes[b]) * pr.inverse_bandwidth[:, p]
        score = pr.horizon_tokens * (compute + comm)
        if self.previous is not None:
            score = score + costmodel.migration_seconds_to_all(pr, b, int(self.previous[b]))
        return score

    def place_best(self, b: int) -> bool:
        """Lowest-scoring device with room (Algorithm 1, lines 5-22); else resolve overload."""
        score = self.score(b)
        fits = self.free() >= self.pr.memory_bytes[b]
        if fits.any():
            self.put(b, int(np.argmin(np.where(fits, score, np.inf))))
            return True
        return self.resolve_overload(b, score)

    def _relocation_target(self, r: int, exclude: int) -> int:
        free = self.free()
        fits = free >= self.pr.memory_bytes[r]
        fits[exclude] = False
        if not fits.any():
            return -1
        return int(np.argmin(np.where(fits, self.score(r), np.inf)))

    def resolve_overload(self, b: int, score: np.ndarray) -> bool:
        """ResolveResourceOverload (§IV-B1): make room for ``b`` on a device by moving others away."""
        need = self.pr.memory_bytes[b]
        mem = self.pr.memory_bytes
        for j in np.argsort(score, kind="stable"):
            j = int(j)
            deficit = need - self.free()[j]
            if need > self.pr.memory_limit_bytes[j]:
                continue
            movable = [int(r) for r in np.flatnonzero(self.assign == j) if not self.frozen[r]]
            # one block that alone frees enough, smallest first
            for r in sorted((r for r in movable if mem[r] >= deficit), key=lambda r: (mem[r], r)):
                k = self._relocation_target(r, j)
                if k >= 0:
                    self.put(r, k)
                    self.put(b, j)
                    return True
            # else the fewest blocks, largest first, each to a device with room
            moved: list[tuple[int, int]] = []
            for r in sorted(movable, key=lambda r: (-mem[r], r)):
                if need <= self.free()[j]:
                    break
                k = self._relocation_target(r, j)
                if k >= 0:
                    moved.append((r, j))
                    self.put(r, k)
            if need <= self.free()[j]:
                self.put(b, j)
                return True
            for r, back in reversed(moved):  # undo: the partial eviction did not help
                self.put(r, back)
                self.frozen[r] = self.previous is not None and back != self.previous[r]
        return False

    def backtrack(self) -> list[int]:
        """BacktrackForResourceViolations (§IV-B2): from every overloaded device evict the
        smallest set of blocks that brings it under its memory; returns them for re-placing."""
        mem = self.pr.memory_bytes
        evicted: list[int] = []
        free = self.free()
        for j in np.argsort(free, kind="stable"):
            j = int(j)
            deficit = -self.free()[j]
            if deficit <= 0:
                continue
            on_j = [int(r) for r in np.flatnonzero(self.assign == j)]
            single = sorted((r for r in on_j if mem[r] >= deficit), key=lambda r: (mem[r], r))
            chosen = single[:1] or []
            if not chosen:
                for r in sorted(on_j, key=lambda r: (-mem[r], r)):
                    chosen.append(r)
                    if sum(mem[c] for c in chosen) >= deficit:
                        break
            for r in chosen:
                self.remove(r)
                evicted.append(r)
        return evicted


def _feasibility_check(problem: Problem) -> Infeasible | None:
    total, cap = float(problem.memory_bytes.sum()), float(problem.memory_limit_bytes.sum())
    if total > cap:
        return Infeasible(f"the blocks need {total:.4g} B but the devices have {cap:.4g} B in all")
    biggest = int(np.argmax(problem.memory_bytes))
    if problem.memory_bytes[biggest] > problem.memory_limit_bytes.max():
        return Infeasible(
            f"block {problem.blocks[biggest]} needs {problem.memory_bytes[biggest]:.4g} B, "
            f"more than any device has ({problem.cluster.memory_bytes.max():.4g} B)"
        )
    return None


class ResourceAware:
    """Resource-aware placement; ``place(problem, previous)`` per interval."""

    name = "resource-aware"

    def __init__(self, config: ResourceAwareConfig | None = None) -> None:
        self.config = config or ResourceAwareConfig()

    def place(self, problem: Problem, previous: Placement | None) -> Decision:
        bad = _feasibility_check(problem)
        if bad is not None:
            return bad
        budget = Budget(self.config)
        prev = None
        if previous is not None and len(previous.device_of_block) == problem.n_blocks:
            prev = previous.array()
            if prev.min() < 0 or prev.max() >= problem.n_devices:
                prev = None
        try:
            if prev is None:
                return self._cold(problem, budget)
            return self._warm(problem, prev, budget)
        except OutOfBudget as stop:
            return Infeasible(f"no feasible placement before the {stop}")

    def repaired(self, problem: Problem, previous: Placement) -> Placement | None:
        """``previous`` with only the blocks that no longer fit moved (the warm start's "stay"),
        or None when it cannot be repaired. The re-plan gate (controller/replan_gate.py) weighs a
        proposal against it when the previous placement no longer fits."""
        if len(previous.device_of_block) != problem.n_blocks:
            return None
        prev = previous.array()
        if prev.min() < 0 or prev.max() >= problem.n_devices:
            return None
        try:
            builder = _Builder(problem, prev, prev, Budget(self.config))
            evicted = builder.backtrack()
            rank = {int(b): i for i, b in enumerate(demand_order(problem))}
            for b in sorted(evicted, key=lambda b: rank[b]):
                if not builder.place_best(b):
                    return None
        except OutOfBudget:
            return None
        decision = _checked(problem, builder.assign)
        return decision if isinstance(decision, Placement) else None

    # -------------------------------------------------------------- cold start

    def _construct(self, problem: Problem, order: np.ndarray, budget: Budget) -> tuple[np.ndarray, np.ndarray] | Infeasible:
        builder = _Builder(problem, np.full(problem.n_blocks, -1, dtype=np.int64), None, budget)
        pending = [int(b) for b in order]
        for _round in range(3):
            failed = [b for b in pending if not builder.place_best(b)]
            if not failed:
                return builder.assign, order
            # BacktrackForResourceViolations: free room by evicting the smallest blocks around
            # the devices with the most space and place the failed ones first.
            pending = failed
            for b in failed:
                j = int(np.argmax(builder.free()))
                for r in sorted(np.flatnonzero(builder.assign == j), key=lambda r: (problem.memory_bytes[r], r)):
                    if builder.free()[j] >= problem.memory_bytes[b]:
                        break
                    builder.remove(int(r))
                    pending.append(int(r))
        return Infeasible(f"could not pack the blocks into device memory ({len(pending)} blocks left over)")

    def _cold(self, problem: Problem, budget: Budget) -> Decision:
        """Build from several starts, improve each, keep the best (ties: the first)."""
        demand = demand_order(problem)
        starts: list[tuple[np.ndarray, np.ndarray] | Infeasible] = [self._construct(problem, demand, budget)]
        chain = layer_chain(problem) if self.config.layer_chain_start else None
        if chain is not None:
            starts.append((chain.array(), demand))
        small = problem.n_blocks * problem.n_devices <= self.config.multi_start_max_size
        if small:
            execution = np.arange(problem.n_blocks)
            starts.append(self._construct(problem, execution, budget))
        reason = next((s.reason for s in starts if isinstance(s, Infeasible)), "no construction succeeded")
        states = [(SearchState(problem, s[0]), s[1]) for s in starts if not isinstance(s, Infeasible)]
        if not small and states:  # large: improve only the start that is best before the search
            states = [min(states, key=lambda s: s[0].total_seconds())]
        best: SearchState | None = None
        for state, order in states:
            improve(state, order, None, np.zeros(problem.n_blocks, dtype=bool), budget, self.config)
            if best is None or state.total_seconds() < best.total_seconds() * (1 - 1e-12):
                best = state
        if best is None:
            return Infeasible(reason)
        if problem.n_blocks * problem.n_devices <= self.config.kick_max_size:
            try:
                best = kick(best, demand, budget, self.config)
            except OutOfBudget:
                pass
        return _checked(problem, best.assign)

    # -------------------------------------------------------------- warm start

    def _warm(self, problem: Problem, prev: np.ndarray, budget: Budget) -> Decision:
        order = demand_order(problem)
        builder = _Builder(problem, prev, prev, budget)
        evicted = builder.backtrack()
        rank = {int(b): i for i, b in enumerate(order)}
        for b in sorted(evicted, key=lambda b: rank[b]):
            if not builder.place_best(b):
                # the previous placement cannot be repaired: place from scratch instead
                return self._cold(problem, budget)
        stay_state = SearchState(problem, builder.assign)
        stay_objective = objective_with_migration(stay_state, prev)
        state = SearchState(problem, builder.assign)
        improve(state, order, prev, builder.frozen.copy(), budget, self.config)
        best, best_objective = state.assign, objective_with_migration(state, prev)
        for jump in jumps(problem):
            objective = objective_with_migration(SearchState(problem, jump), prev)
            if objective < best_objective * (1 - 1e-12):
                best, best_objective = jump, objective
        if best_objective < stay_objective * (1.0 - self.config.hysteresis_fraction):
            return _checked(problem, best)
        return _checked(problem, builder.assign)


def whole_model_placements(problem: Problem) -> list[np.ndarray]:
    """Everything on one device, for each device that holds it."""
    total = float(problem.memory_bytes.sum())
    return [np.full(problem.n_blocks, d, dtype=np.int64) for d in range(problem.n_devices)
            if total <= problem.memory_limit_bytes[d]]


def jumps(problem: Problem) -> list[np.ndarray]:
    """Placements a warm start compares beside its local search: everything on one device, for
    each device that holds it, and the contiguous layer-shard plan."""
    out = whole_model_placements(problem)
    chain = layer_chain(problem)
    if chain is not None:
        out.append(chain.array())
    return out


def _checked(problem: Problem, assign: np.ndarray) -> Decision:
    placement = Placement.of(assign)
    violations = costmodel.memory_violations(problem, placement)
    if violations:
        return Infeasible("internal error: " + "; ".join(map(str, violations)))
    return placement
