"""Exact placement: exhaustive search for tiny instances, CP-SAT (OR-Tools) beyond.

Both minimise the same objective as the heuristics (costmodel.objective_seconds:
horizon * per-token latency + migration delay) under the memory constraint (eq. 1).

CP-SAT works on integers, so every time coefficient is rounded to a unit of
1e-9 of an upper bound of the objective; the placement it returns is re-evaluated
with the float cost model. Reported status: OPTIMAL, FEASIBLE (time limit hit, with a
bound and a gap), INFEASIBLE or UNKNOWN.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from edgeheads.controller import costmodel
from edgeheads.controller.problem import Decision, Infeasible, Placement, Problem


@dataclass(frozen=True)
class ExactResult:
    decision: Decision
    status: str
    objective_seconds: float | None
    bound_seconds: float | None
    gap: float | None
    """(objective - bound) / objective; 0 when proven optimal."""
    wall_seconds: float


def exhaustive(problem: Problem, previous: Placement | None = None, max_placements: int = 500_000) -> ExactResult:
    """Try every memory-feasible placement (depth-first, pruning on memory). Ties go to the
    lexicographically smallest placement."""
    start = time.perf_counter()
    n, nb = problem.n_devices, problem.n_blocks
    if n**nb > max_placements:
        raise ValueError(f"{n}^{nb} placements is more than max_placements={max_placements}; use cpsat()")
    cap = problem.memory_limit_bytes
    mem = problem.memory_bytes
    best: tuple[float, tuple[int, ...]] | None = None
    used = np.zeros(n)
    assign = [0] * nb

    def dfs(b: int) -> None:
        nonlocal best
        if b == nb:
            placement = Placement(tuple(assign))
            value = costmodel.objective_seconds(problem, placement, previous)
            if best is None or value < best[0] - 1e-15 * max(abs(value), 1.0):
                best = (value, placement.device_of_block)
            return
        for d in range(n):
            if used[d] + mem[b] <= cap[d]:
                used[d] += mem[b]
                assign[b] = d
                dfs(b + 1)
                used[d] -= mem[b]

    dfs(0)
    wall = time.perf_counter() - start
    if best is None:
        return ExactResult(Infeasible("no placement satisfies the memory constraints"), "INFEASIBLE", None, None, None, wall)
    return ExactResult(Placement(best[1]), "OPTIMAL", best[0], best[0], 0.0, wall)


def _objective_upper_bound(problem: Problem) -> float:
    """A crude bound on the objective of any placement (seconds), for the integer scale."""
    inv_max = float(problem.inverse_flops_per_second.max())
    lat = problem.link_latency_seconds
    inv_bw = problem.inverse_bandwidth
    worst_message = float(lat.max() + max(problem.residual_bytes, float(problem.output_bytes.sum())) * inv_bw.max())
    latency = float(problem.flops.sum()) * inv_max + (3 * problem.layout.n_layers + 1) * worst_message
    migration = float((lat.max() + problem.migration_bytes * inv_bw.max()).sum())
    return problem.horizon_tokens * latency + migration


def cpsat(
    problem: Problem,
    previous: Placement | None = None,
    time_limit_seconds: float = 30.0,
    workers: int = 1,
    hint: Placement | None = None,
) -> ExactResult:
    """Solve the interval's placement exactly with CP-SAT (see the module docstring)."""
    start = time.perf_counter()
    pr, lay = problem, problem.layout
    n, nb = pr.n_devices, pr.n_blocks
    unit = max(_objective_upper_bound(pr), 1e-30) / 1e9

    def q(seconds: float) -> int:
        return int(round(seconds / unit))

    big = q(_objective_upper_bound(pr) / max(pr.horizon_tokens, 1)) + 1
    inv, lat, inv_bw, mx = pr.inverse_flops_per_second, pr.link_latency_seconds, pr.inverse_bandwidth, pr.residual_message_seconds
    m = cp_model.CpModel()
    x = [[m.NewBoolVar(f"x_{b}_{d}") for d in range(n)] for b in range(nb)]
    for b in range(nb):
        m.AddExactlyOne(x[b])
    # memory in integer units of 2^-40 of the largest figure: demands round up, limits down
    mem_unit = max(float(pr.memory_limit_bytes.max()), float(pr.memory_bytes.max()), 1.0) / 2**40
    for d in range(n):
        m.Add(
            sum(math.ceil(pr.memory_bytes[b] / mem_unit) * x[b][d] for b in range(nb))
            <= math.floor(pr.memory_limit_bytes[d] / mem_unit)
        )

    terms: list = []
    for layer in range(lay.n_layers):
        attn = [int(a) for a in lay.attention[layer]]
        pj, fb = int(lay.projection[layer]), int(lay.ffn[layer])
        src = int(lay.ffn[layer - 1]) if layer > 0 else None
        phase = m.NewIntVar(0, big, f"phase_{layer}")
        for k in range(n):
            hosts = m.NewBoolVar(f"y_{layer}_{k}")
            m.AddMaxEquality(hosts, [x[a][k] for a in attn])
            recv = m.NewIntVar(0, big, f"recv_{layer}_{k}")
            if src is not None:
                for s in range(n):
                    if s != k:
                        m.Add(recv >= q(mx[s, k])).OnlyEnforceIf([x[src][s], hosts])
            elif pr.headnode is not None and pr.headnode != k:
                m.Add(recv >= q(mx[pr.headnode, k])).OnlyEnforceIf(hosts)
            send = m.NewIntVar(0, big, f"send_{layer}_{k}")
            for p in range(n):
                if p != k:
                    m.Add(
                        send >= q(lat[k, p]) * hosts + sum(q(pr.output_bytes[a] * inv_bw[k, p]) * x[a][k] for a in attn)
                    ).OnlyEnforceIf(x[pj][p])
            m.Add(phase >= recv + sum(q(pr.flops[a] * inv[k]) * x[a][k] for a in attn) + send)
        for s, p in itertools.product(range(n), range(n)):  # proj needs x_l too
            if s == p:
                continue
            if src is not None:
                m.Add(phase >= q(mx[s, p])).OnlyEnforceIf([x[src][s], x[pj][p]])
            elif pr.headnode == s:
                m.Add(phase >= q(mx[s, p])).OnlyEnforceIf(x[pj][p])
        to_ffn = m.NewIntVar(0, big, f"to_ffn_{layer}")
        for p, f in itertools.product(range(n), range(n)):
            if p != f:
                m.Add(to_ffn >= q(mx[p, f])).OnlyEnforceIf([x[pj][p], x[fb][f]])
        terms += [phase, to_ffn]
        terms += [q(pr.flops[pj] * inv[d]) * x[pj][d] for d in range(n)]
        terms += [q(pr.flops[fb] * inv[d]) * x[fb][d] for d in range(n)]
    if pr.headnode is not None:
        last = int(lay.ffn[-1])
        terms += [q(mx[d, pr.headnode]) * x[last][d] for d in range(n)]
    migration: list = []
    if previous is not None:
        for b in range(nb):
            row = costmodel.migration_seconds_to_all(pr, b, previous.device_of_block[b])
            migration += [q(row[d]) * x[b][d] for d in range(n) if row[d] > 0]
    m.Minimize(pr.horizon_tokens * sum(terms) + sum(migration))
    if hint is not None:
        for b, d in enumerate(hint.device_of_block):
            for e in range(n):
                m.AddHint(x[b][e], int(e == d))

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_seconds)
    solver.parameters.num_workers = int(workers)
    code = solver.Solve(m)
    status = solver.StatusName(code)
    wall = time.perf_counter() - start
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        placement = Placement.of([next(d for d in range(n) if solver.Value(x[b][d])) for b in range(nb)])
        value = costmodel.objective_seconds(pr, placement, previous)
        objective_int, bound_int = solver.ObjectiveValue(), solver.BestObjectiveBound()
        gap = 0.0 if code == cp_model.OPTIMAL else max(objective_int - bound_int, 0.0) / max(objective_int, 1e-30)
        return ExactResult(placement, status, value, bound_int * unit, gap, wall)
    if code == cp_model.INFEASIBLE:
        return ExactResult(Infeasible("CP-SAT proved that no placement fits in memory"), status, None, None, None, wall)
    return ExactResult(Infeasible(f"CP-SAT found no placement within {time_limit_seconds} s ({status})"), status, None, None, None, wall)


class Exact:
    """Exhaustive search when it is small enough, CP-SAT otherwise. ``last`` keeps the
    most recent ExactResult (status and gap) for reports."""

    name = "exact"

    def __init__(self, time_limit_seconds: float = 30.0, exhaustive_limit: int = 20_000, workers: int = 1) -> None:
        self.time_limit_seconds = time_limit_seconds
        self.exhaustive_limit = exhaustive_limit
        self.workers = workers
        self.last: ExactResult | None = None

    def solve(self, problem: Problem, previous: Placement | None) -> ExactResult:
        if problem.n_devices**problem.n_blocks <= self.exhaustive_limit:
            self.last = exhaustive(problem, previous, self.exhaustive_limit)
        else:
            self.last = cpsat(problem, previous, self.time_limit_seconds, self.workers)
        return self.last

    def place(self, problem: Problem, previous: Placement | None) -> Decision:
        return self.solve(problem, previous).decision
