"""The in-process block engine: every block of every layer, run in one process.

This is the reference path the distributed runtime must reproduce, and the
``--local`` mode of the CLI. One forward call runs the head's embedding, then per
layer the attention blocks of every KV group, the projection and the FFN, then
the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgeheads.headnode.head import HeadStage
from edgeheads.headnode.slicing import ModelParts
from edgeheads.worker.blocks.attention import AttentionBlock
from edgeheads.worker.blocks.factory import make_block
from edgeheads.worker.blocks.ffn import FeedForwardBlock
from edgeheads.worker.blocks.projection import ProjectionBlock
from edgeheads.common.spec import BlockId, BlockKind


@dataclass
class LayerBlocks:
    attention: list[AttentionBlock]  # one per KV group, in group order
    projection: ProjectionBlock
    ffn: FeedForwardBlock

    def __post_init__(self) -> None:
        self.shared_norm = len({b.norm_key for b in self.attention}) == 1
        self.fused_qkv = self.shared_norm and adjacent_views([b.weights["qkv.weight"] for b in self.attention])
        if self.fused_qkv:
            first = self.attention[0].weights
            self.qkv_weight = extend_view(first["qkv.weight"], len(self.attention))
            self.qkv_bias = extend_view(first["qkv.bias"], len(self.attention)) if "qkv.bias" in first else None
            self.qkv_width = first["qkv.weight"].shape[0]


def adjacent_views(tensors: list[torch.Tensor]) -> bool:
    """True when the tensors are contiguous row blocks that follow each other in one storage."""
    first = tensors[0]
    step = first.numel() * first.element_size()
    return all(t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype
               and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
               and t.data_ptr() == first.data_ptr() + i * step for i, t in enumerate(tensors))


def extend_view(first: torch.Tensor, count: int) -> torch.Tensor:
    """A view of ``count`` adjacent copies of ``first``'s shape, starting at ``first``: (count*rows, ...)."""
    shape = (count * first.shape[0], *first.shape[1:])
    return torch.as_strided(first, shape, first.stride())


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
            normed = layer.attention[0].normalize(x) if layer.shared_norm else None  # one norm for every group
            if layer.fused_qkv:
                # every group's q/k/v projection as one matmul over the groups' adjacent weights
                qkv = F.linear(normed, layer.qkv_weight, layer.qkv_bias).split(layer.qkv_width, dim=-1)
                heads = torch.cat([b.forward(session, x, normed, part) for b, part in zip(layer.attention, qkv)],
                                  dim=-1)  # (1, T, H*d)
            else:
                heads = torch.cat([b.forward(session, x, normed) for b in layer.attention], dim=-1)
            x = layer.ffn.forward(layer.projection.forward(heads, x))  # (1, T, D)
        self.lengths[session] = start + ids.numel()
        return self.head.logits(x)

    def drop_session(self, session: str) -> None:
        self.lengths.pop(session, None)
        for layer in self.layers:
            for block in layer.attention:
                block.drop_session(session)
