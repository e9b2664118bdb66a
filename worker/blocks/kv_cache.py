"""The K/V cache of one attention block for one session."""

from __future__ import annotations

import torch


class KVCache:
    """K and V rows of one KV head, grown by doubling.

    Storage: ``keys``/``values`` of shape (capacity, d); the first ``length`` rows are
    valid. Keys are stored after RoPE.
    """

    def __init__(self, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 initial_capacity: int = 64) -> None:
        self.length = 0
        self.keys = torch.empty(initial_capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the valid rows (what a migration moves): 2 * length * d * b."""
        return 2 * self.length * self.keys.shape[-1] * self.keys.element_size()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v: (T, d). Returns views of all valid rows: (S, d)."""
        new_len = self.length + k.shape[0]
        if new_len > self.capacity:
            self._grow(new_len)
        self.keys[self.length:new_len] = k
        self.values[self.length:new_len] = v
        self.length = new_len
        return self.keys[:new_len], self.values[:new_len]

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        keys = self.keys.new_empty(capacity, self.keys.shape[-1])
        values = torch.empty_like(keys)
        keys[:self.length] = self.keys[:self.length]
        values[:self.length] = self.values[:self.length]
        self.keys, self.values = keys, values

    def export(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``start..length`` as contiguous (S', d) tensors (for migration)."""
        return self.keys[start:self.length].contiguous(), self.values[start:self.length].contiguous()

    def load(self, keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Write (S', d) rows at ``start``, truncating anything after them."""
        if start > self.length:
            raise ValueError(f"cache has {self.length} tokens; cannot load rows starting at {start}")
        self.length = start
        self.append(keys, values)
