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
from edgeheads.worker.kernels import formats_in, kernel_for, pack_in_place

LayerBlocks = LayerExecutor  # the name earlier code and tests use


class BlockEngine:
    """Runs ModelParts in-process. Sessions are independent: each attention block
    keeps one K/V cache per session id."""

    def __init__(self, parts: ModelParts, pack_weights: bool = False) -> None:
        """``pack_weights``: this engine may rewrite ``parts``' q4 codes in place into the int4
        kernel's layout (``pack_q4``), after which nothing else can read them. Only for a caller
        that owns the parts and will not ship, hash or dequantize them (the CLI's --local)."""
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
        if pack_weights and "q4" in used and kernel_for("q4", self.head.dtype) == "int4pack":
            self.pack_q4()

    def pack_q4(self) -> int:
        """The layers' q4 weights rewritten in place in the int4 kernel's layout (this engine never
        ships a block), so each is held once rather than beside a packed copy: ~1/8 of an fp32
        model's bytes less resident memory. The head's tables stay as they are (the embedding
        is read by row)."""
        from edgeheads.headnode.loading import release_free_memory

        dtype = self.head.dtype
        saved = sum(pack_in_place(weights, dtype) for layer in self.layers
                    for weights in (*(g.qkv for g in layer.groups), layer.projection.weights, layer.ffn.weights))
        release_free_memory()  # the repacking's temporaries
        return saved

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
