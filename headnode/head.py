"""The head node's own part of the model: embeddings in, final norm and LM head out."""

from __future__ import annotations

import torch

from edgeheads.common.formats import compute_dtype_of
from edgeheads.common.spec import ModelShape
from edgeheads.worker.blocks.functional import layer_norm, rms_norm
from edgeheads.worker.kernel_probe import select_kernels
from edgeheads.worker.kernels import embedding, formats_in, linear


class HeadNodeCompute:
    """Weights as ModelParts.head documents them."""

    def __init__(self, shape: ModelShape, weights: dict[str, torch.Tensor]) -> None:
        self.shape = shape
        self.weights = weights
        self._dtype = compute_dtype_of({n: t for n, t in weights.items() if n != "embed.weight"})
        select_kernels(self._dtype, self.weights["norm.weight"].device.type, formats_in(weights))

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the norm), which activations travel in."""
        return self._dtype

    def embed(self, token_ids: torch.Tensor, start: int) -> torch.Tensor:
        """token_ids: (T,) int64 at positions start..start+T-1. Returns x_0: (1, T, D)."""
        if start + token_ids.numel() > self.shape.max_positions:
            raise ValueError(f"context of {start + token_ids.numel()} tokens exceeds the model's "
                             f"{self.shape.max_positions} positions")
        x = embedding(token_ids, self.weights, "embed.weight", self.dtype)  # (T, D)
        if self.shape.arch == "gpt2":
            x = x + self.weights["pos.weight"][start:start + token_ids.numel()]
        return x[None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (1, T, D), the last layer's output. Returns the last token's logits: (V,)."""
        last = x[0, -1:]  # (1, D)
        if self.shape.arch == "gpt2":
            last = layer_norm(last, self.weights["norm.weight"], self.weights["norm.bias"], self.shape.norm_eps)
        else:
            last = rms_norm(last, self.weights["norm.weight"], self.shape.norm_eps)
        return linear(last, self.weights, "lm_head.weight")[0]
