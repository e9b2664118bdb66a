"""The in-process block engine: every block of every layer, run in one process.

This is the reference path the distributed runtime must reproduce, and the
``--local`` mode of the CLI. One forward call runs the head's embedding, then per
layer the attention blocks of every KV group, the projection and the FFN, then
the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeheads.headnode.head import HeadStage
from edgeheads.headnode.slicing import ModelParts
from edgeheads.worker.blocks.attention import AttentionBlock
from edgeheads.worker.blocks.factory import make_block
from edgeheads.worker.blocks.ffn import FeedForwardBlock
from edgeheads.worker.blocks.projection import ProjectionBlock
from edgeheads.worker.blocks.spec import BlockId, BlockKind


@dataclass
class LayerBlocks:
    attention: list[AttentionBlock]  # one per KV group, in group order
    projection: ProjectionBlock
    ffn: FeedForwardBlock


class BlockEngine:
    """Runs ModelParts in-process. Sessions are independent: each attention block
    keeps one K/V cache per session id."""

    def __init__(self, parts: ModelParts) -> None:
        self.shape = parts.shape
        self.head = HeadStage(parts.shape, parts.head)
        self.layers: list[LayerBlocks] = []
        for layer in range(self.shape.n_layers):
            attention = [make_block(BlockId(layer, BlockKind.ATTENTION, g), self.shape,
                                    parts.blocks[BlockId(layer, BlockKind.ATTENTION, g)])
                         for g in range(self.shape.n_kv_heads)]
            proj = make_block(BlockId(layer, BlockKind.PROJECTION), self.shape,
                              parts.blocks[BlockId(layer, BlockKind.PROJECTION)])
            ffn = make_block(BlockId(layer, BlockKind.FFN), self.shape, parts.blocks[BlockId(layer, BlockKind.FFN)])
            self.layers.append(LayerBlocks(attention, proj, ffn))  # type: ignore[arg-type]
        self.lengths: dict[str, int] = {}

    def blocks(self) -> list:
        """Every block, in execution order."""
        return [b for layer in self.layers for b in (*layer.attention, layer.projection, layer.ffn)]

    @torch.inference_mode()
    def forward(self, session: str, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed new tokens (prefill: the prompt; decode: one token) for ``session``.
        Returns the logits of the last token: (V,) in the model's dtype."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)  # (T,)
        start = self.lengths.get(session, 0)
        x = self.head.embed(ids, start)  # (1, T, D)
        for layer in self.layers:
            heads = torch.cat([block.forward(session, x) for block in layer.attention], dim=-1)  # (1, T, H*d)
            x = layer.ffn.forward(layer.projection.forward(heads, x))  # (1, T, D)
        self.lengths[session] = start + ids.numel()
        return self.head.logits(x)

    def drop_session(self, session: str) -> None:
        self.lengths.pop(session, None)
        for layer in self.layers:
            for block in layer.attention:
                block.drop_session(session)
