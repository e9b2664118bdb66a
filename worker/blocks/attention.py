"""attn(l, g): the pre-attention norm, q/k/v for one KV group, RoPE, and causal
attention over the group's own per-session K/V cache.

``attend`` runs several groups of one layer as one (the worker executor's fused path);
a block alone is the case G = 1 of the same code."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from edgeheads.worker.blocks.base import Block
from edgeheads.worker.blocks.functional import apply_rope, grouped_attention, layer_norm, rms_norm, rope_tables
from edgeheads.worker.blocks.kv_cache import (DEFAULT_CAPACITY, KVCache, new_store, share_store, shared_store,
                                              store_capacity)
from edgeheads.worker.kernels import linear


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
        # weight name -> (this block's weight, a number of blocks, the view over that many blocks'
        # rows from it): worker/executor.py's group_view
        self.group_views: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}

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
    def cache(self, session: str, capacity: int = DEFAULT_CAPACITY) -> KVCache:
        """The session's cache, created empty with room for ``capacity`` rows on first use."""
        cache = self.caches.get(session)
        if cache is None:
            cache = self.caches[session] = KVCache(self.shape.head_dim, self.dtype, self.weights["qkv.weight"].device,
                                                   capacity)
        return cache

    def drop_session(self, session: str) -> None:
        self.caches.pop(session, None)

    def rope(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sign-folded sin for positions start..stop-1: (T, d) each (tables grow rarely)."""
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
            self._norm_key = (self.block_id.layer, *(hash(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                                                     for t in parts))
        return self._norm_key

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-attention norm of x: (1, T, D) -> (1, T, D)."""
        s, w = self.shape, self.weights
        self.check_input(x, s.hidden_size)
        if s.arch == "gpt2":
            return layer_norm(x, w["norm.weight"], w["norm.bias"], s.norm_eps)
        return rms_norm(x, w["norm.weight"], s.norm_eps)

    def forward(self, session: str, x: torch.Tensor, normed: torch.Tensor | None = None,
                reserve_tokens: int = 0) -> torch.Tensor:
        """This group alone: x (1, T, D) -> (1, T, q*d). ``normed``, when given, must be
        ``normalize(x)`` of a block with the same ``norm_key``."""
        return attend([self], session, x, self.weights, normed, reserve_tokens)


def planned_capacity(blocks: list[AttentionBlock], session: str, needed: int, reserve_tokens: int) -> int | None:
    """The rows of the store ``session_caches`` will allocate for these blocks' caches of
    ``session`` to hold ``needed`` rows, or None when the store they share suffices.
    The worker's memory guard (worker/cache_guard.py) asks this before a call runs."""
    caches = [b.caches.get(session) for b in blocks]
    if all(c is None for c in caches):
        return store_capacity(needed, reserve_tokens)
    if any(c is None for c in caches):  # a block new to the session joins the others' store
        capacity = max(c.capacity for c in caches if c is not None)
        return store_capacity(needed, reserve_tokens, capacity)
    store = shared_store(caches)  # type: ignore[arg-type]
    if store is not None and store.shape[2] >= needed:
        return None
    return store_capacity(needed, reserve_tokens, caches[0].capacity)  # type: ignore[union-attr]


def session_caches(blocks: list[AttentionBlock], session: str, needed: int, reserve_tokens: int) -> torch.Tensor:
    """The session's caches of ``blocks`` as slots 0..G-1 of one store with room for ``needed``
    rows: (2, G, capacity, d). Allocates only for a new session, growth or a re-pack (after a
    migration brought in one block's cache alone), ``planned_capacity`` rows: a new store
    holds exactly the session's reservation (``reserve_tokens``) when it has one."""
    first = blocks[0]
    capacity = planned_capacity(blocks, session, needed, reserve_tokens)
    if capacity is None:
        return blocks[0].caches[session].store
    if all(session not in b.caches for b in blocks):
        device = first.weights["qkv.weight"].device
        store = new_store(len(blocks), capacity, first.shape.head_dim, first.dtype, device)
        for slot, block in enumerate(blocks):
            block.caches[session] = KVCache.in_store(store, slot)
        return store
    return share_store([b.cache(session, 1) for b in blocks], capacity)  # a missing cache: empty, 1 row


def attend(blocks: list[AttentionBlock], session: str, x: torch.Tensor, qkv: Mapping[str, torch.Tensor],
           normed: torch.Tensor | None = None, reserve_tokens: int = 0) -> torch.Tensor:
    """G attention blocks of one layer with equal norms, run as one: one norm, one q/k/v matmul,
    one batched attention over their caches.

    x: (1, T, D). qkv: ``qkv.weight`` of logical shape (G*(q+2)*d, D), the blocks' rows in
    block order, in any weight format (with its ``.scale``/``.min``), and ``qkv.bias`` likewise. Every block's cache must hold the same number of tokens.
    Returns the groups' head outputs in block order: (1, T, G*q*d).
    """
    first = blocks[0]
    s, G, T = first.shape, len(blocks), x.shape[1]
    q_heads, d = s.heads_per_group, s.head_dim
    h = first.normalize(x) if normed is None else normed
    qkv = linear(h, qkv, "qkv.weight", qkv.get("qkv.bias")).view(T, G, q_heads + 2, d).permute(1, 2, 0, 3)  # (G, q+2, T, d)
    past = blocks[0].caches[session].length if session in blocks[0].caches else 0
    stop = past + T
    store = session_caches(blocks, session, stop, reserve_tokens)  # (2, G, capacity, d)
    if s.arch == "llama":
        cos, sin = first.rope(past, stop)  # (T, d)
        qk = apply_rope(qkv[:, :q_heads + 1], cos, sin)  # (G, q+1, T, d): the q heads and the k head
        q, k = qk[:, :q_heads], qk[:, q_heads]  # (G, q, T, d), (G, T, d)
    else:
        q, k = qkv[:, :q_heads], qkv[:, q_heads]
    store[0, :, past:stop] = k
    store[1, :, past:stop] = qkv[:, q_heads + 1]
    for block in blocks:
        block.caches[session].length = stop
    return grouped_attention(q, store[0, :, :stop], store[1, :, :stop], past, first._scale)  # (1, T, G*q*d)
