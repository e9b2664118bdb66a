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
        self._norm_key: tuple | None = None

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
    @property
    def norm_key(self) -> tuple:
        """Equal for blocks whose pre-attention norms are equal: such blocks of one layer on
        one worker may share a normalized input (see ``normalize``)."""
        if self._norm_key is None:
            w = self.weights
            parts = [w["norm.weight"]] + ([w["norm.bias"]] if "norm.bias" in w else [])
            self._norm_key = (self.block_id.layer, *(hash(t.cpu().numpy().tobytes()) for t in parts))
        return self._norm_key

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-attention norm of x: (1, T, D) -> (1, T, D)."""
        s, w = self.shape, self.weights
        self.check_input(x, s.hidden_size)
        if s.arch == "gpt2":
            return layer_norm(x, w["norm.weight"], w["norm.bias"], s.norm_eps)
        return rms_norm(x, w["norm.weight"], s.norm_eps)

    def forward(self, session: str, x: torch.Tensor, normed: torch.Tensor | None = None,
                qkv: torch.Tensor | None = None) -> torch.Tensor:
        """x: (1, T, D). ``normed``, when given, must be ``normalize(x)`` of a block with the
        same ``norm_key`` (it saves recomputing the norm for each group of a layer); ``qkv``,
        when given, is this block's q/k/v projection of it, (1, T, (q+2)*d), computed by a
        caller that ran several groups' projections as one matmul."""
        s, w = self.shape, self.weights
        q_heads, d, T = s.heads_per_group, s.head_dim, x.shape[1]
        if qkv is None:
            h = self.normalize(x) if normed is None else normed
            qkv = F.linear(h, w["qkv.weight"], w.get("qkv.bias"))  # (1, T, (q+2)*d)
        qkv = qkv.view(T, q_heads + 2, d).transpose(0, 1)  # (q+2, T, d)
        cache = self.cache(session)
        past = cache.length
        if s.arch == "llama":
            cos, sin = self._rope(past, past + T)  # (T, d)
            qk = apply_rope(qkv[:q_heads + 1], cos, sin)  # (q+1, T, d): the q heads and the k head
            q, k = qk[:q_heads], qk[q_heads]  # (q, T, d), (T, d)
        else:
            q, k = qkv[:q_heads], qkv[q_heads]
        keys, values = cache.append(k, qkv[q_heads + 1])  # (S, d) each
        if T == 1:
            # decode: the q query rows against the single KV head, no mask needed
            scores = torch.mm(q.reshape(q_heads, d), keys.t()).mul_(self._scale)  # (q, S)
            return torch.mm(scores.softmax(-1), values).view(1, 1, q_heads * d)
        if past == 0:
            out = F.scaled_dot_product_attention(q, keys[None], values[None], is_causal=True, scale=self._scale)
        else:
            # chunk after existing context: query t sees keys 0..past+t
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, keys[None], values[None], attn_mask=mask, scale=self._scale)
        return out.transpose(0, 1).reshape(1, T, q_heads * d)  # (q, T, d) -> (1, T, q*d)
