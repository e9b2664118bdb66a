"""The bridge from the live cluster to the placement engine: build the interval's
Problem from what workers report, run one of the issue-4 algorithms as a controller
policy, and predict a placement's per-token latency with the cost model.

Links the workers have measured (probes, block pulls) use their figures; any other
link gets the assumed bandwidth and latency (defaults: 100 Mbit/s and 1 ms, a typical
wired edge network).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeheads.controller.algorithms import make_algorithm
from edgeheads.controller.costmodel import token_latency_seconds
from edgeheads.controller.problem import Cluster, Device, Infeasible, ModelDemand, Placement, Problem
from edgeheads.controller.spread import InfeasiblePlacement, WorkerCapacity
from edgeheads.common.spec import BlockId, ModelShape

DEFAULT_BANDWIDTH_BYTES_PER_SECOND = 100e6 / 8
DEFAULT_LATENCY_SECONDS = 1e-3
DEFAULT_FLOPS = 1e10  # for a worker that has not measured itself yet


@dataclass(frozen=True)
class LiveWorker:
    name: str
    memory_available_bytes: int
    compute_flops: float
    links: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer name -> (bytes/s, one-way s)


def live_problem(shape: ModelShape, workers: list[LiveWorker], context_tokens: int, interval_tokens: int = 16,
                 bandwidth_bytes_per_second: float = DEFAULT_BANDWIDTH_BYTES_PER_SECOND,
                 latency_seconds: float = DEFAULT_LATENCY_SECONDS) -> Problem:
    ordered = sorted(workers, key=lambda w: w.name)
    devices = [Device(w.name, float(w.memory_available_bytes), w.compute_flops or DEFAULT_FLOPS,
                      w.compute_flops or DEFAULT_FLOPS) for w in ordered]
    n = len(ordered)
    bandwidth = np.full((n, n), float(bandwidth_bytes_per_second))
    latency = np.full((n, n), float(latency_seconds))
    index = {w.name: i for i, w in enumerate(ordered)}
    for i, w in enumerate(ordered):  # measured links replace the assumption, in both directions
        for peer, (bw, lat) in w.links.items():
            if peer in index:
                j = index[peer]
                if bw > 0:
                    bandwidth[i, j] = bandwidth[j, i] = bw
                if lat > 0:
                    latency[i, j] = latency[j, i] = lat
    cluster = Cluster.from_devices(devices, bandwidth, latency)
    return Problem.build(ModelDemand.from_shape(shape), cluster, max(1, context_tokens), interval_tokens,
                         horizon_tokens=interval_tokens)


def to_indices(problem: Problem, placement: dict[BlockId, str]) -> Placement | None:
    index = {name: i for i, name in enumerate(problem.cluster.names)}
    if set(placement) != set(problem.blocks) or not set(placement.values()) <= set(index):
        return None
    return Placement.of(np.array([index[placement[b]] for b in problem.blocks]))


def to_names(problem: Problem, placement: Placement) -> dict[BlockId, str]:
    return {b: problem.cluster.names[int(d)] for b, d in zip(problem.blocks, placement.array())}


def predicted_token_seconds(shape: ModelShape, workers: list[LiveWorker], placement: dict[BlockId, str],
                            context_tokens: int) -> float | None:
    """The cost model's per-token latency of ``placement`` (None if it names unknown workers)."""
    problem = live_problem(shape, workers, context_tokens)
    indices = to_indices(problem, placement)
    return None if indices is None else token_latency_seconds(problem, indices)


class AlgorithmPolicy:
    """A controller policy that runs a placement algorithm ("resource-aware", ...)."""

    uses_previous = True
    uses_compute = True

    def __init__(self, algorithm: str) -> None:
        self.algorithm = make_algorithm(algorithm)

    def __call__(self, shape: ModelShape, workers: list[WorkerCapacity], context_tokens: int,
                 previous: dict[BlockId, str] | None = None, live: list[LiveWorker] | None = None
                 ) -> dict[BlockId, str]:
        known = {w.name: w for w in live or []}
        live = [known.get(w.name, LiveWorker(w.name, w.memory_available_bytes, 0.0)) for w in workers]
        problem = live_problem(shape, live, context_tokens)
        decision = self.algorithm.place(problem, to_indices(problem, previous) if previous else None)
        if isinstance(decision, Infeasible):
            raise InfeasiblePlacement(decision.reason)
        return to_names(problem, decision)
