"""Token-by-token simulation of one placement algorithm over a generation (§V-B).

The environment (background load, link jitter) is drawn from the scenario seed, so every
algorithm sees the same trajectory. Every ``interval_tokens`` tokens the algorithm gets
the current snapshot and the previous placement; between decisions the true per-token
latency uses the state of that token, which may have changed since the decision.

Per token it records: latency (inference + migration + paging), memory (sum over
devices and the largest device), overflow, and the decision time when one was made.

Memory overflow: a static plan may come to hold more than a device has (K/V growth,
background memory). The run goes on, and each token pays ``overflow_bytes /
swap_bandwidth_bytes_per_second`` for every overloaded device, the time to read the
part that does not fit back from swap (decode touches every weight once per token).

Re-plans that pay (controller/replan_gate.py): for the algorithms in GATED_ALGORITHMS the
planner sees smoothed telemetry, and a proposal that moves blocks is adopted only when its
gain over the expected persistence of the conditions beats its migration cost
(``ReplanSettings``; ``ReplanSettings.off()`` plans on raw snapshots and adopts everything,
as the paper does). Migrations are always charged on the true state of the token.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from edgeheads.controller import costmodel, replan_gate
from edgeheads.controller.problem import Cluster, Infeasible, Placement, PlacementAlgorithm, Problem
from edgeheads.controller.scenario import Setup


GATED_ALGORITHMS = ("resource-aware", "dynamic-layer")
"""The dynamic algorithms that weigh migration: smoothed view and gate on by default. The
others keep the paper's behaviour (greedy and block-round-robin re-place blindly; static,
edgeshard and galaxy never move; exact is the per-interval optimum)."""


@dataclass(frozen=True)
class ReplanSettings:
    """How the simulated controller re-plans (see controller/replan_gate.py)."""

    gate: bool = True
    smoothing_tokens: float = replan_gate.SMOOTHING_TOKENS
    """EWMA time constant of the planner's view in tokens (0: raw snapshots)."""
    prior_tokens: float = replan_gate.PRIOR_TOKENS
    precopy_slowdown: float = math.inf
    """inf: migrations block decoding, as this simulator charges them (eq. 7)."""

    @classmethod
    def off(cls) -> "ReplanSettings":
        return cls(gate=False, smoothing_tokens=0.0)

    @classmethod
    def default_for(cls, algorithm: str) -> "ReplanSettings":
        return cls() if algorithm in GATED_ALGORITHMS else cls.off()


@dataclass
class _Task:
    device: int
    end_step: int
    compute_fraction: float
    memory_fraction: float


class Environment:
    """Device and link state per token: background tasks and bandwidth jitter."""

    def __init__(self, setup: Setup) -> None:
        self.base = setup.cluster
        self.spec = setup.scenario.background
        self.rng = np.random.default_rng(setup.scenario.seed + 1_000_003)
        self.tasks: list[_Task] = []
        n = self.base.n_devices
        self.jitter = np.ones((n, n))

    def step(self, step: int) -> Cluster:
        """Advance to ``step`` (call with 0, 1, 2, ...) and return the state for that token."""
        n = self.base.n_devices
        spec = self.spec
        self.tasks = [t for t in self.tasks if t.end_step > step]
        starts = self.rng.random(n) < spec.start_probability_per_token
        for d in np.flatnonzero(starts):
            duration = max(1, int(round(float(spec.duration_tokens.draw(self.rng, 1)[0]))))
            self.tasks.append(
                _Task(
                    int(d), step + duration,
                    float(spec.compute_fraction.draw(self.rng, 1)[0]),
                    float(spec.memory_fraction.draw(self.rng, 1)[0]),
                )
            )
        compute_load = np.zeros(n)
        memory_load = np.zeros(n)
        for t in self.tasks:
            compute_load[t.device] += t.compute_fraction
            memory_load[t.device] += t.memory_fraction
        for e in spec.events:
            if e.start_token <= step < e.end_token:
                d = self.base.names.index(e.device)
                compute_load[d] += e.compute_fraction
                memory_load[d] += e.memory_fraction
        if spec.bandwidth_jitter_fraction > 0:
            f = spec.bandwidth_jitter_fraction
            self.jitter = np.clip(self.jitter * np.exp(self.rng.normal(0.0, f / 4, (n, n))), 1 - f, 1 + f)
        return Cluster(
            names=self.base.names,
            memory_bytes=self.base.memory_bytes * (1 - np.minimum(memory_load, 0.95)),
            peak_flops_per_second=self.base.peak_flops_per_second,
            available_flops_per_second=self.base.peak_flops_per_second * (1 - np.minimum(compute_load, 0.95)),
            bandwidth_bytes_per_second=self.base.bandwidth_bytes_per_second * self.jitter,
            latency_seconds=self.base.latency_seconds,
        )


@dataclass(frozen=True)
class TokenRecord:
    step: int
    context_tokens: int
    latency_seconds: float
    """Inference + migration + paging for this token."""
    inference_seconds: float
    migration_seconds: float
    paging_seconds: float
    memory_sum_bytes: float
    memory_max_bytes: float
    overflow_bytes: float
    migrations: int
    decision_seconds: float | None


@dataclass
class RunResult:
    algorithm: str
    tokens: list[TokenRecord] = field(default_factory=list)
    failed: str | None = None
    decisions: int = 0
    infeasible_decisions: int = 0
    kept_by_gate: int = 0
    """Proposals that moved blocks and were not adopted because they would not pay."""

    @property
    def total_latency_seconds(self) -> float:
        return float(sum(t.latency_seconds for t in self.tokens)) if not self.failed else float("inf")

    @property
    def total_migration_seconds(self) -> float:
        return float(sum(t.migration_seconds for t in self.tokens))

    def summary(self) -> dict[str, float | int | str | None]:
        decisions = [t.decision_seconds for t in self.tokens if t.decision_seconds is not None]
        return {
            "algorithm": self.algorithm,
            "failed": self.failed,
            "tokens": len(self.tokens),
            "total_latency_seconds": self.total_latency_seconds,
            "mean_token_latency_seconds": self.total_latency_seconds / max(len(self.tokens), 1),
            "last_token_latency_seconds": self.tokens[-1].latency_seconds if self.tokens else None,
            "total_migration_seconds": self.total_migration_seconds,
            "migrations": int(sum(t.migrations for t in self.tokens)),
            "total_paging_seconds": float(sum(t.paging_seconds for t in self.tokens)),
            "tokens_with_overflow": int(sum(t.overflow_bytes > 0 for t in self.tokens)),
            "peak_memory_max_bytes": max((t.memory_max_bytes for t in self.tokens), default=0.0),
            "peak_memory_sum_bytes": max((t.memory_sum_bytes for t in self.tokens), default=0.0),
            "decisions": self.decisions,
            "infeasible_decisions": self.infeasible_decisions,
            "kept_by_gate": self.kept_by_gate,
            "mean_decision_seconds": float(np.mean(decisions)) if decisions else 0.0,
        }


def simulate(setup: Setup, algorithm: PlacementAlgorithm, replan: ReplanSettings | None = None) -> RunResult:
    """Run ``algorithm`` over the scenario's generation; see the module docstring.
    ``replan`` defaults to ``ReplanSettings.default_for(algorithm.name)``."""
    sc = setup.scenario
    replan = ReplanSettings.default_for(algorithm.name) if replan is None else replan
    env = Environment(setup)
    tracker = replan_gate.PersistenceTracker(prior=replan.prior_tokens)
    weight = replan_gate.ewma_weight(1.0, replan.smoothing_tokens)
    view: Cluster | None = None
    result = RunResult(algorithm.name)
    placement: Placement | None = None
    for step in range(sc.new_tokens):
        cluster = env.step(step)
        view = replan_gate.smooth_cluster(view, cluster, weight)
        if replan.gate:
            tracker.observe(replan_gate.device_conditions(cluster), step)
        context = sc.prompt_tokens + step + 1  # tokens in the cache once this one is added
        decision_seconds = None
        moves: tuple[costmodel.Migration, ...] = ()
        if step % sc.interval_tokens == 0:
            remaining = sc.new_tokens - step
            horizon = min(sc.migration_horizon_tokens or sc.interval_tokens, remaining)
            interval = min(sc.interval_tokens, remaining)
            problem = Problem.build(setup.demand, view, context, interval, horizon, setup.headnode)
            started = time.perf_counter()
            decision = algorithm.place(problem, placement)
            decision_seconds = time.perf_counter() - started
            result.decisions += 1
            if isinstance(decision, Infeasible):
                result.infeasible_decisions += 1
                if placement is None:
                    result.failed = f"step {step}: {decision.reason}"
                    return result
            else:
                if replan.gate and placement is not None:
                    persistence = {i: tracker.persistence(name) for i, name in enumerate(view.names)}
                    repair = getattr(algorithm, "repaired", None)
                    broken = repair is not None and replan_gate.infeasible_reason(problem, placement) is not None
                    repaired = repair(problem, placement) if broken else None
                    chosen, _ = replan_gate.choose(problem, placement, decision, persistence, replan.precopy_slowdown,
                                                   remaining, replan.prior_tokens, repaired)
                    if chosen is not decision:
                        result.kept_by_gate += 1
                    decision = chosen
                truth = problem if view is cluster else Problem.build(
                    setup.demand, cluster, context, interval, horizon, setup.headnode)
                moves = costmodel.migrations(truth, placement, decision)
                placement = decision
        assert placement is not None
        now = Problem.build(setup.demand, cluster, context, 1, 1, setup.headnode)
        inference = costmodel.token_latency_seconds(now, placement)
        used = costmodel.device_memory_bytes(now, placement)
        overflow = np.maximum(used - cluster.memory_bytes, 0.0)
        paging = float(overflow.sum()) / sc.swap_bandwidth_bytes_per_second
        migration = float(sum(m.seconds for m in moves))
        result.tokens.append(
            TokenRecord(
                step=step,
                context_tokens=context,
                latency_seconds=inference + migration + paging,
                inference_seconds=inference,
                migration_seconds=migration,
                paging_seconds=paging,
                memory_sum_bytes=float(used.sum()),
                memory_max_bytes=float(used.max()),
                overflow_bytes=float(overflow.sum()),
                migrations=len(moves),
                decision_seconds=decision_seconds,
            )
        )
    return result


def simulate_many(setup: Setup, algorithms: list[PlacementAlgorithm]) -> dict[str, RunResult]:
    """Each algorithm over the same scenario (same environment trajectory)."""
    return {a.name: simulate(setup, a) for a in algorithms}
