"""Build a block object from its id, the model shape and its weights."""

from __future__ import annotations

import torch

from edgeheads.worker.blocks.attention import AttentionBlock
from edgeheads.worker.blocks.base import Block
from edgeheads.worker.blocks.ffn import FeedForwardBlock
from edgeheads.worker.blocks.projection import ProjectionBlock
from edgeheads.common.spec import BlockId, BlockKind, ModelShape

_CLASSES: dict[BlockKind, type[Block]] = {
    BlockKind.ATTENTION: AttentionBlock,
    BlockKind.PROJECTION: ProjectionBlock,
    BlockKind.FFN: FeedForwardBlock,
}


def make_block(block_id: BlockId, shape: ModelShape, weights: dict[str, torch.Tensor]) -> Block:
    """Checks every weight's name and shape against ``shape`` (BlockShapeError if wrong)."""
    if not 0 <= block_id.layer < shape.n_layers:
        raise ValueError(f"{block_id}: layer out of range for a {shape.n_layers}-layer model")
    if block_id.kind is BlockKind.ATTENTION and not 0 <= block_id.kv_group < shape.n_kv_heads:
        raise ValueError(f"{block_id}: KV group out of range for {shape.n_kv_heads} KV heads")
    return _CLASSES[block_id.kind](block_id, shape, weights)
