"""The placement problem: devices, links, the blocks of an L-layer model, a placement.

Everything here is plain data held in numpy arrays so that the cost model and the
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

from edgeheads.common.spec import (
    BlockId,
    BlockKind,
    ModelShape,
    activation_bytes,
    block_flops_decode,
    block_weight_bytes,
    kv_bytes_per_token,
)


MEMORY_TOLERANCE = 1e-9
"""Relative slack on every memory constraint (see Problem.memory_limit_bytes)."""


@dataclass(frozen=True)
class Device:
    """One worker as the controller sees it during an interval."""

    name: str
    memory_bytes: float
    """Memory available for blocks (weights and K/V caches)."""
    peak_flops_per_second: float
    available_flops_per_second: float
    """What is left after background load; the cost model uses this one."""


@dataclass(frozen=True, eq=False)
class Cluster:
    """Devices and the links between them, as arrays.

    ``bandwidth_bytes_per_second[i, j]`` and ``latency_seconds[i, j]`` describe the
    ordered link i -> j. The diagonal is ignored (a device talks to itself for free).
    """

    names: tuple[str, ...]
    memory_bytes: np.ndarray  # (n,)
    peak_flops_per_second: np.ndarray  # (n,)
    available_flops_per_second: np.ndarray  # (n,)
    bandwidth_bytes_per_second: np.ndarray  # (n, n)
    latency_seconds: np.ndarray  # (n, n)

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0:
            raise ValueError("a cluster needs at least one device")
        if len(set(self.names)) != n:
            raise ValueError(f"device names are not unique: {self.names}")
        for attr in ("memory_bytes", "peak_flops_per_second", "available_flops_per_second"):
            if getattr(self, attr).shape != (n,):
                raise ValueError(f"{attr} must have shape ({n},)")
        for attr in ("bandwidth_bytes_per_second", "latency_seconds"):
            if getattr(self, attr).shape != (n, n):
                raise ValueError(f"{attr} must have shape ({n}, {n})")
        off = ~np.eye(n, dtype=bool)
        if np.any(self.bandwidth_bytes_per_second[off] <= 0):
            raise ValueError("every link needs a positive bandwidth_bytes_per_second")
        if np.any(self.latency_seconds[off] < 0):
            raise ValueError("link latency_seconds cannot be negative")
        if np.any(self.available_flops_per_second <= 0):
            raise ValueError("every device needs positive available_flops_per_second")
        if np.any(self.memory_bytes < 0):
            raise ValueError("memory_bytes cannot be negative")

    @classmethod
    def from_devices(
        cls,
        devices: Sequence[Device],
        bandwidth_bytes_per_second: np.ndarray | float,
        latency_seconds: np.ndarray | float = 0.0,
    ) -> "Cluster":
        """Build from Device records; scalars mean every link is the same."""
        n = len(devices)
        bw = np.broadcast_to(np.asarray(bandwidth_bytes_per_second, dtype=float), (n, n)).copy()
        lat = np.broadcast_to(np.asarray(latency_seconds, dtype=float), (n, n)).copy()
        return cls(
            names=tuple(d.name for d in devices),
            memory_bytes=np.array([d.memory_bytes for d in devices], dtype=float),
            peak_flops_per_second=np.array([d.peak_flops_per_second for d in devices], dtype=float),
            available_flops_per_second=np.array([d.available_flops_per_second for d in devices], dtype=float),
            bandwidth_bytes_per_second=bw,
            latency_seconds=lat,
        )

    @property
    def n_devices(self) -> int:
        return len(self.names)

    def devices(self) -> list[Device]:
        return [
            Device(name, float(m), float(p), float(a))
            for name, m, p, a in zip(
                self.names, self.memory_bytes, self.peak_flops_per_second, self.available_flops_per_second
            )
        ]


@dataclass(frozen=True, eq=False)
class ModelDemand:
    """Per-block resource figures of a model, as linear functions of the context length.

    memory(S) = weight_bytes + S * kv_bytes_per_token
    flops(S)  = flops_base + S * flops_per_context_token      (one decoded token)
    """

    blocks: tuple[BlockId, ...]
    weight_bytes: np.ndarray  # (B,)
    kv_bytes_per_token: np.ndarray  # (B,)
    flops_base: np.ndarray  # (B,)
    flops_per_context_token: np.ndarray  # (B,)
    output_bytes: np.ndarray  # (B,) bytes a block emits per token
    residual_bytes: float
    """Size of the residual stream x_l for one token (D * b): what FFN sends onwards."""

    @classmethod
    def from_shape(cls, shape: ModelShape) -> "ModelDemand":
        """Table I figures (protos/edgeheads/common/spec.py) for every block of ``shape``."""
        ids = tuple(shape.block_ids())
        f0 = np.array([block_flops_decode(shape, b.kind, 0) for b in ids], dtype=float)
        f1 = np.array([block_flops_decode(shape, b.kind, 1) for b in ids], dtype=float)
        return cls(
            blocks=ids,
            weight_bytes=np.array([block_weight_bytes(shape, b.kind) for b in ids], dtype=float),
            kv_bytes_per_token=np.array([kv_bytes_per_token(shape, b.kind) for b in ids], dtype=float),
            flops_base=f0,
            flops_per_context_token=f1 - f0,
            output_bytes=np.array([activation_bytes(shape, b.kind) for b in ids], dtype=float),
            residual_bytes=float(shape.hidden_size * shape.bytes_per_param),
        )

    def memory_bytes(self, context_tokens: int) -> np.ndarray:
        return self.weight_bytes + context_tokens * self.kv_bytes_per_token

    def flops(self, context_tokens: int) -> np.ndarray:
        return self.flops_base + context_tokens * self.flops_per_context_token


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
    ) -> "Problem":
        """The problem for the interval whose first decoded token sees ``context_tokens``
        tokens in the cache: memory is taken at the interval's last token (the most it
        will need) and compute likewise."""
        end = context_tokens + interval_tokens - 1
        return cls(
            cluster=cluster,
            blocks=demand.blocks,
            memory_bytes=demand.memory_bytes(end),
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
    def inverse_bandwidth(self) -> np.ndarray:
        """Seconds per byte on each link, zero on the diagonal, (n, n)."""
        inv = 1.0 / np.where(np.eye(self.n_devices, dtype=bool), 1.0, self.cluster.bandwidth_bytes_per_second)
        np.fill_diagonal(inv, 0.0)
        return inv

    @cached_property
    def residual_message_seconds(self) -> np.ndarray:
        """Time to send one residual-stream message i -> j: latency + D*b / bandwidth, (n, n)."""
        return self.link_latency_seconds + self.residual_bytes * self.inverse_bandwidth


@dataclass(frozen=True, eq=False)
class Layout:
    """Block indices grouped by layer; validates execution order."""

    attention: tuple[np.ndarray, ...]  # per layer, indices of attention blocks
    projection: np.ndarray  # (L,)
    ffn: np.ndarray  # (L,)
    layer_of_block: np.ndarray  # (B,)
    kind_of_block: tuple[BlockKind, ...]

    @property
    def n_layers(self) -> int:
        return len(self.projection)

    @classmethod
    def of(cls, blocks: Sequence[BlockId]) -> "Layout":
        if not blocks:
            raise ValueError("a model needs at least one block")
        n_layers = max(b.layer for b in blocks) + 1
        attention: list[list[int]] = [[] for _ in range(n_layers)]
        proj = [-1] * n_layers
        ffn = [-1] * n_layers
        for i, b in enumerate(blocks):
            if not 0 <= b.layer < n_layers:
                raise ValueError(f"bad layer in {b}")
            if b.kind is BlockKind.ATTENTION:
                attention[b.layer].append(i)
            elif b.kind is BlockKind.PROJECTION:
                if proj[b.layer] >= 0:
                    raise ValueError(f"two projection blocks in layer {b.layer}")
                proj[b.layer] = i
            else:
                if ffn[b.layer] >= 0:
                    raise ValueError(f"two ffn blocks in layer {b.layer}")
                ffn[b.layer] = i
        for layer in range(n_layers):
            if not attention[layer] or proj[layer] < 0 or ffn[layer] < 0:
                raise ValueError(f"layer {layer} needs attention blocks, one proj and one ffn")
        return cls(
            attention=tuple(np.array(a, dtype=np.int64) for a in attention),
            projection=np.array(proj, dtype=np.int64),
            ffn=np.array(ffn, dtype=np.int64),
            layer_of_block=np.array([b.layer for b in blocks], dtype=np.int64),
            kind_of_block=tuple(b.kind for b in blocks),
        )


class PlacementAlgorithm(Protocol):
    """Every algorithm: (problem, previous placement or None) -> Placement or Infeasible."""

    name: str

    def place(self, problem: Problem, previous: Placement | None) -> Decision: ...


def synthetic_blocks(n_layers: int, kv_groups: int) -> tuple[BlockId, ...]:
    """Block ids of an n_layers x (kv_groups + 2) model, for hand-built problems."""
    ids: list[BlockId] = []
    for layer in range(n_layers):
        ids += [BlockId(layer, BlockKind.ATTENTION, g) for g in range(kv_groups)]
        ids += [BlockId(layer, BlockKind.PROJECTION), BlockId(layer, BlockKind.FFN)]
    return tuple(ids)


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
