"""The cost model: the paper's eqs. (1)-(7) generalized to L layers.

This is the readable reference. ``controller/incremental.py`` computes the same
numbers incrementally for the search, and the tests check that both agree.

One decoded token through layer l, with s the device holding ffn(l-1) (or the head
node for layer 0), p the device of proj(l) and f the device of ffn(l):

    message(i, j, bytes) = 0 if i == j else latency[i, j] + bytes / bandwidth[i, j]

    for every device k hosting attention blocks of layer l (one message per device
    per phase, so blocks on one device share the link k -> p serially, eq. 3):
        t_k = message(s, k, D*b)                      x_l arrives
            + sum(flops of layer-l attention on k) / C_k   run one after another (eq. 5)
            + message(k, p, sum of their head outputs)     head outputs to proj
    attention phase  A_l = max_k t_k                   devices run in parallel
    proj starts      P_l = max(A_l, message(s, p, D*b))    proj also needs x_l
    layer latency        = P_l + flops(proj)/C_p + message(p, f, D*b) + flops(ffn)/C_f  (eq. 4, 6)

    token latency = sum_l layer latency + message(f_{L-1}, headnode, D*b)

Memory (eq. 1): sum of the footprints of the blocks on a device <= its memory.
Migration (eq. 2, 7): a block moving i -> j costs latency[i, j] + bytes / bandwidth[i, j];
migrations run one after another, so their delays add up.
Objective of an interval: horizon_tokens * token latency + migration delay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeheads.controller.problem import Placement, Problem


@dataclass(frozen=True)
class LayerBreakdown:
    """Critical-path parts of one layer, in seconds."""

    attention_phase_seconds: float
    """From the layer's input leaving ffn(l-1) until proj(l) may start (A_l or the x_l message)."""
    projection_compute_seconds: float
    projection_to_ffn_seconds: float
    ffn_compute_seconds: float
    attention_compute_seconds: float
    """Compute of the slowest attention device (the part of the phase that is compute)."""

    @property
    def total_seconds(self) -> float:
        return (
            self.attention_phase_seconds
            + self.projection_compute_seconds
            + self.projection_to_ffn_seconds
            + self.ffn_compute_seconds
        )

    @property
    def compute_seconds(self) -> float:
        return self.attention_compute_seconds + self.projection_compute_seconds + self.ffn_compute_seconds


@dataclass(frozen=True)
class LatencyBreakdown:
    """Per-token latency with its parts (seconds)."""

    layers: tuple[LayerBreakdown, ...]
    output_message_seconds: float
    """Last ffn -> head node (0 without a head node)."""

    @property
    def total_seconds(self) -> float:
        return sum(layer.total_seconds for layer in self.layers) + self.output_message_seconds

    @property
    def compute_seconds(self) -> float:
        """Compute on the critical path."""
        return sum(layer.compute_seconds for layer in self.layers)

    @property
    def communication_seconds(self) -> float:
        """Everything on the critical path that is not compute: messages and their latency."""
        return self.total_seconds - self.compute_seconds


@dataclass(frozen=True)
class MemoryViolation:
    device: int
    used_bytes: float
    available_bytes: float

    def __str__(self) -> str:
        return f"device {self.device} holds {self.used_bytes:.0f} B of {self.available_bytes:.0f} B available"


@dataclass(frozen=True)
class Migration:
    block: int
    source: int
    destination: int
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    """Everything the cost model says about one placement in one interval."""

    latency: LatencyBreakdown
    device_memory_bytes: tuple[float, ...]
    violations: tuple[MemoryViolation, ...]
    migrations: tuple[Migration, ...]
    horizon_tokens: int

    @property
    def token_latency_seconds(self) -> float:
        return self.latency.total_seconds

    @property
    def migration_seconds(self) -> float:
        return sum(m.seconds for m in self.migrations)

    @property
    def objective_seconds(self) -> float:
        """horizon_tokens * per-token latency + migration delay (the paper's T + M)."""
        return self.horizon_tokens * self.token_latency_seconds + self.migration_seconds

    @property
    def feasible(self) -> bool:
        return not self.violations


def message_seconds(problem: Problem, source: int | None, destination: int, size_bytes: float) -> float:
    """latency + bytes / bandwidth, or 0 on the same device or with no source."""
    if source is None or source == destination:
        return 0.0
    return float(
        problem.cluster.latency_seconds[source, destination]
        + size_bytes / problem.cluster.bandwidth_bytes_per_second[source, destination]
    )


def layer_breakdown(problem: Problem, placement: Placement, layer: int) -> LayerBreakdown:
    """Latency parts of ``layer`` for one decoded token (see the module docstring)."""
    dev = placement.device_of_block
    lay = problem.layout
    inv = problem.inverse_flops_per_second
    x_bytes = problem.residual_bytes
    source = dev[lay.ffn[layer - 1]] if layer > 0 else problem.headnode
    p = dev[lay.projection[layer]]
    f = dev[lay.ffn[layer]]

    flops_on: dict[int, float] = {}
    out_on: dict[int, float] = {}
    for b in lay.attention[layer]:
        k = dev[b]
        flops_on[k] = flops_on.get(k, 0.0) + float(problem.flops[b])
        out_on[k] = out_on.get(k, 0.0) + float(problem.output_bytes[b])
    attention_phase = 0.0
    attention_compute = 0.0
    for k in sorted(flops_on):
        compute = flops_on[k] * inv[k]
        t_k = message_seconds(problem, source, k, x_bytes) + compute + message_seconds(problem, k, p, out_on[k])
        if t_k > attention_phase:
            attention_phase, attention_compute = t_k, compute
    x_at_projection = message_seconds(problem, source, p, x_bytes)
    if x_at_projection > attention_phase:
        attention_phase, attention_compute = x_at_projection, 0.0
    return LayerBreakdown(
        attention_phase_seconds=attention_phase,
        projection_compute_seconds=float(problem.flops[lay.projection[layer]] * inv[p]),
        projection_to_ffn_seconds=message_seconds(problem, p, f, x_bytes),
        ffn_compute_seconds=float(problem.flops[lay.ffn[layer]] * inv[f]),
        attention_compute_seconds=attention_compute,
    )


def token_latency(problem: Problem, placement: Placement) -> LatencyBreakdown:
    """Per-token decode latency of ``placement`` (eq. 6 over all layers)."""
    lay = problem.layout
    layers = tuple(layer_breakdown(problem, placement, layer) for layer in range(lay.n_layers))
    last = placement.device_of_block[lay.ffn[-1]]
    out = 0.0 if problem.headnode is None else message_seconds(problem, last, problem.headnode, problem.residual_bytes)
    return LatencyBreakdown(layers=layers, output_message_seconds=out)


def token_latency_seconds(problem: Problem, placement: Placement) -> float:
    return token_latency(problem, placement).total_seconds


def device_memory_bytes(problem: Problem, placement: Placement) -> np.ndarray:
    """(n,) bytes held by each device (eq. 1's left-hand side)."""
    return np.bincount(placement.array(), weights=problem.memory_bytes, minlength=problem.n_devices)


def memory_violations(problem: Problem, placement: Placement) -> tuple[MemoryViolation, ...]:
    used = device_memory_bytes(problem, placement)
    cap = problem.cluster.memory_bytes
    return tuple(
        MemoryViolation(int(i), float(used[i]), float(cap[i])) for i in np.flatnonzero(used > problem.memory_limit_bytes)
    )


def migration_seconds_to_all(problem: Problem, block: int, source: int) -> np.ndarray:
    """(n,) seconds to migrate ``block`` from ``source`` to every device (0 to itself), eq. (2)."""
    row = problem.migration_latency_seconds[source] + problem.migration_bytes[block] * problem.inverse_bandwidth[source]
    row = row.copy()
    row[source] = 0.0
    return row


def migrations(problem: Problem, previous: Placement | None, placement: Placement) -> tuple[Migration, ...]:
    """Every block whose device changed, with its delay (eq. 7 sums them)."""
    if previous is None:
        return ()
    if len(previous.device_of_block) != problem.n_blocks:
        raise ValueError("previous placement does not match the problem's blocks")
    moves = []
    for b, (src, dst) in enumerate(zip(previous.device_of_block, placement.device_of_block)):
        if src != dst:
            seconds = float(
                problem.migration_latency_seconds[src, dst] + problem.migration_bytes[b] * problem.inverse_bandwidth[src, dst]
            )
            moves.append(Migration(b, src, dst, seconds))
    return tuple(moves)


def evaluate(problem: Problem, placement: Placement, previous: Placement | None = None) -> Evaluation:
    """Latency with breakdown, memory per device, violations and migrations."""
    if len(placement.device_of_block) != problem.n_blocks:
        raise ValueError(f"placement has {len(placement.device_of_block)} blocks, problem has {problem.n_blocks}")
    if any(not 0 <= d < problem.n_devices for d in placement.device_of_block):
        raise ValueError("placement names a device that does not exist")
    return Evaluation(
        latency=token_latency(problem, placement),
        device_memory_bytes=tuple(float(m) for m in device_memory_bytes(problem, placement)),
        violations=memory_violations(problem, placement),
        migrations=migrations(problem, previous, placement),
        horizon_tokens=problem.horizon_tokens,
    )


def objective_seconds(problem: Problem, placement: Placement, previous: Placement | None = None) -> float:
    """horizon_tokens * token latency + migration seconds."""
    return evaluate(problem, placement, previous).objective_seconds
