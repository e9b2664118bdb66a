"""The placement problem: devices, links, the blocks of an L-layer model, a placement.

The devices live in controller/devices.py and the model's demand in controller/demand.py;
both are importable from here. Everything is plain data held in numpy arrays so that the cost model and the
algorithms can work on whole rows at once. Indices:

    B   number of blocks, in execution order (per layer: attention groups, proj, ffn)
    n   number of devices

A placement maps every block index to one device index. Units are in the names:
``_bytes``, ``_seconds``, ``_flops`` (a count of floating-point operations) and
``_flops_per_second``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, Sequence

import numpy as np

from edgeheads.common.spec import BlockId, BlockKind
from edgeheads.controller.demand import Layout, ModelDemand, synthetic_blocks
from edgeheads.controller.devices import Cluster, Device


MEMORY_TOLERANCE = 1e-9
"""Relative slack on every memory constraint (see Problem.memory_limit_bytes)."""


@dataclass(frozen=True)
class Placement:
    """Block index -> device index, in the problem's block order."""

    device_of_block: tuple[int, ...]

    @classmethod
    def of(cls, devices: Sequence[int] | np.ndarray) -> "Placement":
        return cls(tuple(int(d) for d in devices))

    def array(self) -> np.ndarray:
        return np.asarray(self.device_of_block, dtype=np.int64)

    def as_dict(self, problem: "Problem") -> dict[str, str]:
        """``{"attn(0,1)": "device-name", ...}`` for logs and JSON."""
        return {str(b): problem.cluster.names[d] for b, d in zip(problem.blocks, self.device_of_block)}


@dataclass(frozen=True)
class Infeasible:
    """No placement was found; ``reason`` says why in words."""

    reason: str


Decision = Placement | Infeasible


@dataclass(frozen=True, eq=False)
class Problem:
    """One interval's placement problem.

    ``memory_bytes[b]`` is block b's footprint at the end of the interval (weights plus
    its K/V cache, the paper's m_b(t)); ``migration_bytes[b]`` is what moving it now
    would send (its footprint at the start of the interval). ``flops[b]`` is the work
    for one decoded token. The objective weighs the per-token latency by
    ``horizon_tokens`` (by default the tokens in one interval, as in the paper).
    ``headnode`` is the device index that feeds layer 0 and receives the last FFN's
    output, or None to leave those two messages out.
    """

    cluster: Cluster
    blocks: tuple[BlockId, ...]
    memory_bytes: np.ndarray  # (B,)
    migration_bytes: np.ndarray  # (B,)
    flops: np.ndarray  # (B,)
    output_bytes: np.ndarray  # (B,)
    residual_bytes: float
    interval_tokens: int = 1
    horizon_tokens: int = 0
    headnode: int | None = None
    context_tokens: int = 0

    def __post_init__(self) -> None:
        nb = len(self.blocks)
        for attr in ("memory_bytes", "migration_bytes", "flops", "output_bytes"):
            if getattr(self, attr).shape != (nb,):
                raise ValueError(f"{attr} must have shape ({nb},)")
        if self.interval_tokens < 1:
            raise ValueError("interval_tokens must be at least 1")
        if self.horizon_tokens <= 0:
            object.__setattr__(self, "horizon_tokens", self.interval_tokens)
        if self.headnode is not None and not 0 <= self.headnode < self.cluster.n_devices:
            raise ValueError(f"headnode index {self.headnode} is not a device")
        _ = self.layout  # validates the block structure

    @classmethod
    def build(
        cls,
        demand: ModelDemand,
        cluster: Cluster,
        context_tokens: int,
        interval_tokens: int = 1,
        horizon_tokens: int = 0,
        headnode: int | None = None,
        memory_context_tokens: int = 0,
    ) -> "Problem":
        """The problem for the interval whose first decoded token sees ``context_tokens``
        tokens in the cache: memory is taken at the interval's last token (the most it
        will need) and compute likewise. ``memory_context_tokens``, when more, is the
        context memory must hold instead (a plan that must fit the longest generation
        while it prices the tokens decoding now)."""
        end = context_tokens + interval_tokens - 1
        return cls(
            cluster=cluster,
            blocks=demand.blocks,
            memory_bytes=demand.memory_bytes(max(end, memory_context_tokens)),
            migration_bytes=demand.memory_bytes(max(context_tokens - 1, 0)),
            flops=demand.flops(end),
            output_bytes=demand.output_bytes,
            residual_bytes=demand.residual_bytes,
            interval_tokens=interval_tokens,
            horizon_tokens=horizon_tokens,
            headnode=headnode,
            context_tokens=context_tokens,
        )

    @property
    def n_devices(self) -> int:
        return self.cluster.n_devices

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @cached_property
    def layout(self) -> "Layout":
        return Layout.of(self.blocks)

    @cached_property
    def memory_limit_bytes(self) -> np.ndarray:
        """(n,) what eq. (1) allows on each device: its memory plus a relative
        MEMORY_TOLERANCE, so that a placement filling a device exactly is not lost to
        float rounding. Every feasibility check (cost model, algorithms, exact solvers) uses it."""
        return self.cluster.memory_bytes * (1.0 + MEMORY_TOLERANCE)

    @cached_property
    def inverse_flops_per_second(self) -> np.ndarray:
        """1 / available FLOP/s per device, (n,)."""
        return 1.0 / self.cluster.available_flops_per_second

    @cached_property
    def link_latency_seconds(self) -> np.ndarray:
        """Latency with a zero diagonal, (n, n)."""
        lat = self.cluster.latency_seconds.copy()
        np.fill_diagonal(lat, 0.0)
        return lat

    @cached_property
    def migration_latency_seconds(self) -> np.ndarray:
        """Latency a block's migration pays on each link, with a zero diagonal, (n, n): the link's
        latency unless the cluster says otherwise (``Cluster.migration_latency_seconds``)."""
        if self.cluster.migration_latency_seconds is None:
            return self.link_latency_seconds
        lat = self.cluster.migration_latency_seconds.copy()
        np.fill_diagonal(lat, 0.0)
        return lat

    @cached_property
    def inverse_bandwidth(self) -> np.ndarray:
        """Seconds per byte on each link, zero on the diagonal, (n, n)."""
        inv = 1.0 / np.where(np.eye(self.n_devices, dtype=bool), 1.0, self.cluster.bandwidth_bytes_per_second)
        np.fill_diagonal(inv, 0.0)
        return inv

    @cached_property
    def residual_message_seconds(self) -> np.ndarray:
        """Time to send one residual-stream message i -> j: latency + D*b / bandwidth, (n, n)."""
        return self.link_latency_seconds + self.residual_bytes * self.inverse_bandwidth


class PlacementAlgorithm(Protocol):
    """Every algorithm: (problem, previous placement or None) -> Placement or Infeasible."""

    name: str

    def place(self, problem: Problem, previous: Placement | None) -> Decision: ...


def uniform_problem(
    cluster: Cluster,
    n_layers: int,
    kv_groups: int,
    *,
    attention_memory_bytes: float,
    projection_memory_bytes: float,
    ffn_memory_bytes: float,
    attention_flops: float,
    projection_flops: float,
    ffn_flops: float,
    attention_output_bytes: float,
    residual_bytes: float,
    interval_tokens: int = 1,
    headnode: int | None = None,
) -> Problem:
    """A hand-built problem where every layer has the same block figures."""
    blocks = synthetic_blocks(n_layers, kv_groups)
    by_kind = {
        BlockKind.ATTENTION: (attention_memory_bytes, attention_flops, attention_output_bytes),
        BlockKind.PROJECTION: (projection_memory_bytes, projection_flops, residual_bytes),
        BlockKind.FFN: (ffn_memory_bytes, ffn_flops, residual_bytes),
    }
    mem = np.array([by_kind[b.kind][0] for b in blocks], dtype=float)
    return Problem(
        cluster=cluster,
        blocks=blocks,
        memory_bytes=mem,
        migration_bytes=mem.copy(),
        flops=np.array([by_kind[b.kind][1] for b in blocks], dtype=float),
        output_bytes=np.array([by_kind[b.kind][2] for b in blocks], dtype=float),
        residual_bytes=float(residual_bytes),
        interval_tokens=interval_tokens,
        headnode=headnode,
    )


__all__ = [
    "Cluster",
    "Decision",
    "Device",
    "Infeasible",
    "Layout",
    "MEMORY_TOLERANCE",
    "ModelDemand",
    "Placement",
    "PlacementAlgorithm",
    "Problem",
    "synthetic_blocks",
    "uniform_problem",
]
