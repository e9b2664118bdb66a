"""What a model asks of the devices, block by block: memory and FLOPs as linear functions of
the context length, and the blocks' grouping by layer (see controller/problem.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeheads.common.spec import (
    BlockId,
    BlockKind,
    ModelShape,
    activation_bytes,
    block_ids,
    block_flops_decode,
    block_weight_bytes,
    kv_bytes_per_token,
)


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


def synthetic_blocks(n_layers: int, kv_groups: int) -> tuple[BlockId, ...]:
    """Block ids of an n_layers x (kv_groups + 2) model, for hand-built problems."""
    return tuple(block_ids(n_layers, kv_groups))


__all__ = ["Layout", "ModelDemand", "synthetic_blocks"]
