"""attn(l, g): the pre-attention norm, q/k/v for one KV group, RoPE, and causal
attention over the group's own per-session K/V cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeheads.worker.blocks.base import Block
from edgeheads.worker.blocks.functional import apply_rope, layer_norm, rms_norm, rope_tables
from edgeheads.worker.blocks.kv_cache import KVCache


class AttentionBlock(Block):
    """Weights (q = query heads per group, d = head dim, D = hidden):

    norm.weight (D,) [+ norm.bias (D,) for LayerNorm]
    qkv.weight ((q + 2) * d, D): q heads' W_q rows, then W_k and W_v of KV head g
    qkv.bias ((q + 2) * d,) when the model has q/k/v bias
    rope.inv_freq (d/2,) and rope.scaling () for RoPE models

    Input x_l: (1, T, D). Output: the group's head outputs, (1, T, q * d).
    """

    def __init__(self, block_id, shape, weights) -> None:
        super().__init__(block_id, shape, weights)
        self.caches: dict[str, KVCache] = {}
        self._cos = self._sin = None
        self._scale = shape.head_dim ** -0.5

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.shape
        rows = (s.heads_per_group + 2) * s.head_dim
        want: dict[str, tuple[int, ...]] = {"norm.weight": (s.hidden_size,), "qkv.weight": (rows, s.hidden_size)}
        if s.arch == "gpt2":
            want["norm.bias"] = (s.hidden_size,)
        else:
            want["rope.inv_freq"] = (s.head_dim // 2,)
            want["rope.scaling"] = ()
        if s.qkv_bias:
            want["qkv.bias"] = (rows,)
        return want

    # ------------------------------------------------------------------ sessions
    def cache(self, session: str) -> KVCache:
        """The session's cache, created empty on first use."""
        cache = self.caches.get(session)
        if cache is None:
            cache = self.caches[session] = KVCache(self.shape.head_dim, self.dtype, self.weights["qkv.weight"].device)
        return cache

    def drop_session(self, session: str) -> None:
        self.caches.pop(session, None)

    def _rope(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < stop:
            n = max(stop, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            cos, sin = rope_tables(self.weights["rope.inv_freq"], float(self.weights["rope.scaling"]), n)
            dev = self.weights["qkv.weight"].device
            self._cos, self._sin = cos.to(dev, self.dtype), sin.to(dev, self.dtype)
        return self._cos[start:stop], self._sin[start:stop]

    # ------------------------------------------------------------------ compute
    def forward(self, session: str, x: torch.Tensor) -> torch.Tensor:
        s, w = self.shape, self.weights
        self.check_input(x, s.hidden_size)
        q_heads, d, T = s.heads_per_group, s.head_dim, x.shape[1]
        if s.arch == "gpt2":
            h = layer_norm(x, w["norm.weight"], w["norm.bias"], s.norm_eps)
        else:
            h = rms_norm(x, w["norm.weight"], s.norm_eps)
        qkv = F.linear(h, w["qkv.weight"], w.get("qkv.bias"))  # (1, T, (q+2)*d)
        qkv = qkv.view(1, T, q_heads + 2, d).transpose(1, 2)  # (1, q+2, T, d)
        cache = self.cache(session)
        past = cache.length
        if s.arch == "llama":
            cos, sin = self._rope(past, past + T)  # (T, d)
            qk = apply_rope(qkv[:, :q_heads + 1], cos, sin)  # (1, q+1, T, d): the q heads and the k head
            q, k = qk[:, :q_heads], qk[:, q_heads:]
        else:
            q, k = qkv[:, :q_heads], qkv[:, q_heads:q_heads + 1]  # (1, q, T, d), (1, 1, T, d)
        keys, values = cache.append(k, qkv[:, q_heads + 1:])  # (1, 1, S, d)
        if T == 1:
            # decode: the q query rows against the single KV head, no mask needed
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, scale=self._scale)  # (1, 1, q, d)
            return out.reshape(1, 1, q_heads * d)
        if past == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self._scale, enable_gqa=True)
        else:
            # chunk after existing context: query t sees keys 0..past+t
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self._scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(1, T, q_heads * d)  # (1, T, q*d)

