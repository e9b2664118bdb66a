"""Incremental form of the cost model, for the search.

``SearchState`` holds a complete placement with per-layer sums cached, and answers
"what would the per-token latency become if block b moved to device j, for every j"
as one numpy row, in O(n * blocks-per-layer) time. It computes exactly the numbers
of ``costmodel.token_latency`` (tests check this on random placements).

A block's move only changes its own layer, and for ffn(l) also layer l+1 (whose input
comes from ffn(l)) or the final message to the head node.
"""

from __future__ import annotations

import numpy as np

from edgeheads.controller.problem import Problem
from edgeheads.common.spec import BlockKind

_NEG_INF = -np.inf


class SearchState:
    """A complete placement plus cached sums; ``move`` keeps them up to date."""

    def __init__(self, problem: Problem, assign: np.ndarray) -> None:
        if np.any(assign < 0) or np.any(assign >= problem.n_devices):
            raise ValueError("SearchState needs a complete placement")
        self.problem = problem
        lay = problem.layout
        self.layout = lay
        n, n_layers = problem.n_devices, lay.n_layers
        self.n = n
        self.n_layers = n_layers
        self.assign = assign.astype(np.int64).copy()
        self.inv = problem.inverse_flops_per_second
        self.lat = problem.link_latency_seconds
        self.inv_bw = problem.inverse_bandwidth
        self.mx = problem.residual_message_seconds
        self.head = -1 if problem.headnode is None else int(problem.headnode)
        codes = {BlockKind.ATTENTION: 0, BlockKind.PROJECTION: 1, BlockKind.FFN: 2}
        self.kind = np.array([codes[k] for k in lay.kind_of_block], dtype=np.int64)  # (B,)
        self.attn_flops = np.zeros((n_layers, n))
        self.attn_out = np.zeros((n_layers, n))
        self.attn_count = np.zeros((n_layers, n), dtype=np.int64)
        for layer in range(n_layers):
            for b in lay.attention[layer]:
                d = self.assign[b]
                self.attn_flops[layer, d] += problem.flops[b]
                self.attn_out[layer, d] += problem.output_bytes[b]
                self.attn_count[layer, d] += 1
        self.proj_dev = self.assign[lay.projection].copy()
        self.ffn_dev = self.assign[lay.ffn].copy()
        self.used_bytes = np.bincount(self.assign, weights=problem.memory_bytes, minlength=n).astype(float)
        self.layer_seconds = np.array([self._layer_seconds(layer) for layer in range(n_layers)])
        self.tail_seconds = self._tail_seconds()
        self.touched = np.zeros(n_layers, dtype=bool)
        """Layers whose latency a ``move`` changed since the caller last cleared this."""

    # ------------------------------------------------------------------ exact values

    def _source(self, layer: int) -> int:
        return int(self.ffn_dev[layer - 1]) if layer > 0 else self.head

    def _layer_seconds(self, layer: int) -> float:
        pr = self.problem
        s = self._source(layer)
        p, f = int(self.proj_dev[layer]), int(self.ffn_dev[layer])
        recv = self.mx[s] if s >= 0 else 0.0
        t = recv + self.attn_flops[layer] * self.inv + self.lat[:, p] + self.attn_out[layer] * self.inv_bw[:, p]
        t = np.where(self.attn_count[layer] > 0, t, _NEG_INF)
        xp = self.mx[s, p] if s >= 0 else 0.0
        lay = self.layout
        return float(
            max(t.max(), xp)
            + pr.flops[lay.projection[layer]] * self.inv[p]
            + self.mx[p, f]
            + pr.flops[lay.ffn[layer]] * self.inv[f]
        )

    def _tail_seconds(self) -> float:
        return float(self.mx[self.ffn_dev[-1], self.head]) if self.head >= 0 else 0.0

    def total_seconds(self) -> float:
        """Per-token latency of the current placement."""
        return float(self.layer_seconds.sum() + self.tail_seconds)

    def free_bytes(self) -> np.ndarray:
        return self.problem.memory_limit_bytes - self.used_bytes

    # ------------------------------------------------------------------ what-if rows

    def latency_delta(self, block: int) -> np.ndarray:
        """(n,) change of the per-token latency if ``block`` moved to each device (0 where it is)."""
        kind = self.kind[block]
        if kind == 0:
            return self._attention_delta(block)
        if kind == 1:
            return self._projection_delta(block)
        return self._ffn_delta(block)

    def _rest_after_projection(self, layer: int) -> float:
        pr, lay = self.problem, self.layout
        p, f = int(self.proj_dev[layer]), int(self.ffn_dev[layer])
        return float(
            pr.flops[lay.projection[layer]] * self.inv[p] + self.mx[p, f] + pr.flops[lay.ffn[layer]] * self.inv[f]
        )

    def _attention_delta(self, block: int) -> np.ndarray:
        pr = self.problem
        layer = int(self.layout.layer_of_block[block])
        i = int(self.assign[block])
        fa, oa = pr.flops[block], pr.output_bytes[block]
        flops = self.attn_flops[layer].copy()
        out = self.attn_out[layer].copy()
        count = self.attn_count[layer].copy()
        flops[i] -= fa
        out[i] -= oa
        count[i] -= 1
        s = self._source(layer)
        p = int(self.proj_dev[layer])
        recv = self.mx[s] if s >= 0 else np.zeros(self.n)
        lat_p, inv_bw_p = self.lat[:, p], self.inv_bw[:, p]
        t = np.where(count > 0, recv + flops * self.inv + lat_p + out * inv_bw_p, _NEG_INF)  # (n,) other devices
        t_with = recv + (flops + fa) * self.inv + lat_p + (out + oa) * inv_bw_p  # (n,) device j with the block
        top = int(np.argmax(t))
        first = t[top]
        t[top] = _NEG_INF
        others = np.full(self.n, first)
        others[top] = t.max()
        attention = np.maximum(others, t_with)
        xp = self.mx[s, p] if s >= 0 else 0.0
        new = np.maximum(attention, xp) + self._rest_after_projection(layer)
        delta = new - self.layer_seconds[layer]
        delta[i] = 0.0
        return delta

    def _projection_delta(self, block: int) -> np.ndarray:
        pr, lay = self.problem, self.layout
        layer = int(lay.layer_of_block[block])
        p = int(self.proj_dev[layer])
        f = int(self.ffn_dev[layer])
        hosts = np.flatnonzero(self.attn_count[layer] > 0)  # (m,)
        s = self._source(layer)
        recv = self.mx[s, hosts] if s >= 0 else 0.0
        base = recv + self.attn_flops[layer, hosts] * self.inv[hosts]  # (m,)
        send = self.lat[hosts, :] + self.attn_out[layer, hosts][:, None] * self.inv_bw[hosts, :]  # (m, n)
        attention = (base[:, None] + send).max(axis=0)  # (n,)
        xp = self.mx[s] if s >= 0 else 0.0
        new = np.maximum(attention, xp) + pr.flops[block] * self.inv + self.mx[:, f] + pr.flops[lay.ffn[layer]] * self.inv[f]
        delta = new - self.layer_seconds[layer]
        delta[p] = 0.0
        return delta

    def _ffn_delta(self, block: int) -> np.ndarray:
        pr, lay = self.problem, self.layout
        layer = int(lay.layer_of_block[block])
        f = int(self.ffn_dev[layer])
        p = int(self.proj_dev[layer])
        ff = pr.flops[block]
        head_part = self.layer_seconds[layer] - self.mx[p, f] - ff * self.inv[f]
        delta = head_part + self.mx[p, :] + ff * self.inv - self.layer_seconds[layer]
        delta = delta + self._next_layer_with_source(layer)
        delta[f] = 0.0
        return delta

    def _next_layer_with_source(self, layer: int) -> np.ndarray:
        """(n,) change of everything after ffn(layer) if ffn(layer)'s output left from each device."""
        nxt = layer + 1
        if nxt < self.n_layers:
            hosts = np.flatnonzero(self.attn_count[nxt] > 0)
            p1 = int(self.proj_dev[nxt])
            after = (
                self.attn_flops[nxt, hosts] * self.inv[hosts]
                + self.lat[hosts, p1]
                + self.attn_out[nxt, hosts] * self.inv_bw[hosts, p1]
            )  # (m,)
            attention = (self.mx[:, hosts] + after[None, :]).max(axis=1)  # (n,)
            return np.maximum(attention, self.mx[:, p1]) + self._rest_after_projection(nxt) - self.layer_seconds[nxt]
        if self.head >= 0:
            return self.mx[:, self.head] - self.tail_seconds
        return np.zeros(self.n)

    def layer_delta(self, layer: int) -> np.ndarray:
        """(n,) change of the per-token latency if every block of ``layer`` moved to each device."""
        pr, lay = self.problem, self.layout
        s = self._source(layer)
        recv = self.mx[s] if s >= 0 else np.zeros(self.n)
        work = float(pr.flops[lay.attention[layer]].sum() + pr.flops[lay.projection[layer]] + pr.flops[lay.ffn[layer]])
        own = recv + work * self.inv - self.layer_seconds[layer]
        return own + self._next_layer_with_source(layer)

    # ------------------------------------------------------------------ updates

    def move(self, block: int, device: int) -> None:
        """Put ``block`` on ``device`` and refresh the cached sums of the layers it touches."""
        i = int(self.assign[block])
        j = int(device)
        if i == j:
            return
        pr = self.problem
        layer = int(self.layout.layer_of_block[block])
        mem = pr.memory_bytes[block]
        self.used_bytes[i] -= mem
        self.used_bytes[j] += mem
        self.assign[block] = j
        kind = self.kind[block]
        if kind == 0:
            for d, sign in ((i, -1), (j, 1)):
                self.attn_flops[layer, d] += sign * pr.flops[block]
                self.attn_out[layer, d] += sign * pr.output_bytes[block]
                self.attn_count[layer, d] += sign
            if self.attn_count[layer, i] == 0:  # clear rounding residue
                self.attn_flops[layer, i] = 0.0
                self.attn_out[layer, i] = 0.0
        elif kind == 1:
            self.proj_dev[layer] = j
        else:
            self.ffn_dev[layer] = j
        self.layer_seconds[layer] = self._layer_seconds(layer)
        self.touched[layer] = True
        if kind == 2:
            if layer + 1 < self.n_layers:
                self.layer_seconds[layer + 1] = self._layer_seconds(layer + 1)
                self.touched[layer + 1] = True
            else:
                self.tail_seconds = self._tail_seconds()
