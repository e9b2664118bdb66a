"""ffn(l): the post-attention norm, the MLP, and the residual."""

from __future__ import annotations

import torch

from edgeheads.worker.blocks.base import Block
from edgeheads.worker.blocks.functional import ACTIVATIONS, layer_norm, rms_norm
from edgeheads.worker.kernels import linear, residual_linear


class FeedForwardBlock(Block):
    """Weights (D hidden, I intermediate):

    gated (Llama): norm.weight (D,), gate_up.weight (2I, D), down.weight (D, I)
                   [+ gate_up.bias (2I,), down.bias (D,) with mlp bias]
    plain (GPT-2): norm.weight, norm.bias (D,), fc.weight (I, D), fc.bias (I,),
                   out.weight (D, I), out.bias (D,)

    Input h_l (1, T, D). Output x_{l+1} = h_l + mlp(norm(h_l)), (1, T, D).
    """

    def __init__(self, block_id, shape, weights) -> None:
        super().__init__(block_id, shape, weights)
        if shape.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {shape.activation!r}; supported: {sorted(ACTIVATIONS)}")
        self._act = ACTIVATIONS[shape.activation]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.shape
        D, I = s.hidden_size, s.intermediate_size
        if s.gated_mlp:
            want: dict[str, tuple[int, ...]] = {"norm.weight": (D,), "gate_up.weight": (2 * I, D), "down.weight": (D, I)}
            if s.mlp_bias:
                want |= {"gate_up.bias": (2 * I,), "down.bias": (D,)}
            return want
        return {"norm.weight": (D,), "norm.bias": (D,), "fc.weight": (I, D), "fc.bias": (I,),
                "out.weight": (D, I), "out.bias": (D,)}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s, w = self.shape, self.weights
        self.check_input(h, s.hidden_size, "h")
        if s.gated_mlp:
            n = rms_norm(h, w["norm.weight"], s.norm_eps)
            gate, up = linear(n, w, "gate_up.weight", w.get("gate_up.bias")).chunk(2, dim=-1)  # (1,T,I) x2
            return residual_linear(h, self._act(gate).mul_(up), w, "down.weight", w.get("down.bias"))
        n = layer_norm(h, w["norm.weight"], w["norm.bias"], s.norm_eps)
        return h + linear(self._act(linear(n, w, "fc.weight", w["fc.bias"])), w, "out.weight", w["out.bias"])
