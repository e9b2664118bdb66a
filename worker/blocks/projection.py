"""proj(l): o_proj over the concatenated head outputs, plus bias, plus the residual."""

from __future__ import annotations

import torch

from edgeheads.worker.blocks.base import Block
from edgeheads.worker.kernels import residual_linear


class ProjectionBlock(Block):
    """Weights: o.weight (D, H * d) [+ o.bias (D,)].

    Inputs: heads (1, T, H * d) in KV-group order, x_l (1, T, D).
    Output: h_l = x_l + o_proj(heads), (1, T, D).
    """

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.shape
        want: dict[str, tuple[int, ...]] = {"o.weight": (s.hidden_size, s.n_heads * s.head_dim)}
        if s.o_bias:
            want["o.bias"] = (s.hidden_size,)
        return want

    def forward(self, heads: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        self.check_input(heads, self.shape.n_heads * self.shape.head_dim, "heads")
        self.check_input(residual, self.shape.hidden_size, "residual")
        if heads.shape[1] != residual.shape[1]:
            raise ValueError(f"{self.block_id}: heads cover {heads.shape[1]} tokens, residual {residual.shape[1]}")
        return residual_linear(residual, heads, self.weights, "o.weight", self.weights.get("o.bias"))
