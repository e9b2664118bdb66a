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
    if dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # the same arithmetic, fewer dispatches
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


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int,
                      scale: float) -> torch.Tensor:
    """Causal attention of G KV groups at once, each with its q query heads on one KV head.

    q: (G, q, T, d) for positions past..past+T-1; keys, values: (G, S, d) with S = past + T.
    Returns the head outputs, group after group: (1, T, G*q*d).
    """
    G, q_heads, T, d = q.shape
    S = keys.shape[1]
    if T == 1 and q.dtype == torch.float32:
        # decode: no mask needed; two batched matmuls and a softmax
        scores = torch.bmm(q.reshape(G, q_heads, d), keys.transpose(1, 2)).mul_(scale)  # (G, q, S)
        return torch.bmm(scores.softmax(-1), values).view(1, 1, G * q_heads * d)
    if T == 1 and q.dtype == torch.float16:
        # fp16 decode in fp32: CPUs have no fp16 matmul units, and torch's fp16 attention is
        # 20x slower than upcasting here; the scores of a few hundred keys are cheap to widen
        scores = torch.bmm(q.reshape(G, q_heads, d).float(), keys.float().transpose(1, 2)).mul_(scale)
        out = torch.bmm(scores.softmax(-1), values.float())
        return out.to(q.dtype).view(1, 1, G * q_heads * d)
    if T == 1:
        # bf16 decode: the fused attention kernel. A bf16 bmm goes through oneDNN, which keeps a
        # compiled primitive per new context length (about 0.65 MB each, ~870 MB for 1,000
        # tokens measured here) and runs 8x slower than this
        k4, v4 = keys[:, None].expand(G, q_heads, S, d), values[:, None].expand(G, q_heads, S, d)
        out = F.scaled_dot_product_attention(q, k4, v4, scale=scale)  # (G, q, 1, d)
        return out.reshape(1, 1, G * q_heads * d)
    k4 = keys[:, None].expand(G, q_heads, S, d)  # (G, q, S, d) views
    v4 = values[:, None].expand(G, q_heads, S, d)
    if past == 0:
        out = F.scaled_dot_product_attention(q, k4, v4, is_causal=True, scale=scale)
    else:
        # a chunk after existing context: query t sees keys 0..past+t
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(past)
        out = F.scaled_dot_product_attention(q, k4, v4, attn_mask=mask, scale=scale)  # (G, q, T, d)
    return out.permute(2, 0, 1, 3).reshape(1, T, G * q_heads * d)
