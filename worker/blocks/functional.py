"""Small pure tensor functions shared by the blocks: norms, activations, RoPE."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama computes it: in fp32, then cast back, then scale.  x: (..., D)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim.  x: (..., D)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rope_tables(inv_freq: torch.Tensor, scaling: float, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables for positions 0..n_positions-1, computed as transformers does.

    inv_freq: (d/2,) fp32. Returns cos, sin: (n_positions, d) fp32, multiplied by the
    rope ``attention_scaling`` factor (1.0 unless YaRN-like). The first half of ``sin``
    is negated so that rotate-half becomes a plain roll (see apply_rope).
    """
    positions = torch.arange(n_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # (P, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, d)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    half = sin.shape[-1] // 2
    sin[:, :half] = -sin[:, :half]
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE.  x: (..., T, d); cos, sign-folded sin: (T, d) from rope_tables.

    rotate_half(x) * sin == [-x2, x1] * [s, s] == [x2, x1] * [-s, s] == swap_halves(x) * sin_folded,
    exactly (negation is exact in floating point). Swapping the halves as a flip of a
    (2, d/2) view is one kernel; ``roll`` would be several.
    """
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin
