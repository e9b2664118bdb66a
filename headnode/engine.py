"""The in-process block engine: every block of every layer, run in one process.

This is the reference path the distributed runtime must reproduce, and the
``--local`` mode of the CLI. One forward call runs the head's embedding, then each
layer through the worker's layer executor (the layer's KV groups as one fused group,
the projection and the FFN), then the LM head.
"""

from __future__ import annotations

import torch

from edgeheads.common.spec import layer_block_ids
from edgeheads.headnode.head import HeadNodeCompute
from edgeheads.headnode.slicing import ModelParts
from edgeheads.worker.blocks.factory import make_block
from edgeheads.worker.executor import LayerExecutor
from edgeheads.worker.kernel_probe import select_kernels
from edgeheads.worker.kernels import formats_in

LayerBlocks = LayerExecutor  # the name earlier code and tests use


class BlockEngine:
    """Runs ModelParts in-process. Sessions are independent: each attention block
    keeps one K/V cache per session id."""

    def __init__(self, parts: ModelParts) -> None:
        self.shape = parts.shape
        self.head = HeadNodeCompute(parts.shape, parts.head)
        used = set().union(*(formats_in(w) for w in parts.blocks.values()))
        select_kernels(self.head.dtype, "cpu", used)  # as a worker does when its blocks arrive
        self.layers: list[LayerExecutor] = []
        for layer in range(self.shape.n_layers):
            *attention, proj, ffn = [make_block(b, self.shape, dict(parts.blocks[b]))
                                     for b in layer_block_ids(layer, self.shape.n_kv_heads)]
            self.layers.append(LayerExecutor(attention, proj, ffn))
        self.lengths: dict[str, int] = {}

    def blocks(self) -> list:
        """Every block, in execution order."""
        return [b for layer in self.layers for b in (*layer.attention, layer.projection, layer.ffn)]

    @torch.inference_mode()
    def forward(self, session: str, token_ids: list[int] | torch.Tensor, reserve_tokens: int = 0) -> torch.Tensor:
        """Feed new tokens (prefill: the prompt; decode: one token) for ``session``.
        ``reserve_tokens``: the context length to preallocate caches for when the session
        starts (prompt + new tokens), so that decoding allocates no cache memory.
        Returns the logits of the last token: (V,) in the model's dtype."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)  # (T,)
        start = self.lengths.get(session, 0)
        x = self.head.embed(ids, start)  # (1, T, D)
        for layer in self.layers:
            x = layer.forward(session, x, reserve_tokens)  # (1, T, D)
        self.lengths[session] = start + ids.numel()
        return self.head.logits(x)

    def drop_session(self, session: str) -> None:
        self.lengths.pop(session, None)
        for layer in self.layers:
            layer.drop_session(session)
