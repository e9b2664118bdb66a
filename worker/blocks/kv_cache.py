"""The K/V cache of one attention block for one session: preallocated rows indexed by position.

Co-hosted KV groups of one layer keep their caches for a session in one shared store,
``(2, G, capacity, d)``: each block's cache is the slot ``[:, g]`` of it, so the layer's
attention reads every group's keys with one batched matmul, while each cache can still be
exported, loaded, rolled back or dropped on its own.
"""

from __future__ import annotations

import torch

DEFAULT_CAPACITY = 64


def store_capacity(needed: int, reserve_tokens: int = 0, capacity: int | None = None) -> int:
    """Rows for a store of a session's caches that must hold ``needed`` rows, when the
    session has none yet (``capacity`` None) or its store is being replaced (too small, or
    re-packed after a migration). A session with a reservation that covers ``needed`` gets
    exactly its reservation: that is what the head node's admission ledger counts
    (headnode/admission.py). Past its reservation, or without one, a store grows by
    doubling (at least DEFAULT_CAPACITY rows), and a re-pack keeps a capacity that suffices."""
    if reserve_tokens >= needed:
        return reserve_tokens
    if capacity is None:
        return max(needed, DEFAULT_CAPACITY)
    return capacity if needed <= capacity else max(needed, 2 * capacity)


def store_bytes(groups: int, capacity: int, head_dim: int, element_size: int) -> int:
    """Bytes of a store (2, G, capacity, d): K and V rows of ``groups`` caches."""
    return 2 * groups * capacity * head_dim * element_size


def new_store(groups: int, capacity: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str) -> torch.Tensor:
    """An uninitialized store for ``groups`` caches: (2, G, capacity, d); [0] keys, [1] values."""
    return torch.empty(2, groups, capacity, head_dim, dtype=dtype, device=device)


class KVCache:
    """K and V rows of one KV head. Keys are stored after RoPE.

    ``store`` (2, G, capacity, d) may be shared with the caches of other groups; this cache
    is slot ``slot``: ``keys``/``values`` are (capacity, d) views, of which the first
    ``length`` rows are valid. Appending within capacity allocates nothing.
    """

    def __init__(self, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.length = 0
        self.bind(new_store(1, max(1, capacity), head_dim, dtype, device), 0)

    @classmethod
    def in_store(cls, store: torch.Tensor, slot: int) -> KVCache:
        """An empty cache in slot ``slot`` of an existing store (2, G, capacity, d)."""
        cache = cls.__new__(cls)
        cache.length = 0
        cache.bind(store, slot)
        return cache

    def bind(self, store: torch.Tensor, slot: int) -> None:
        """Use slot ``slot`` of ``store`` (2, G, capacity, d); its rows must already hold this
        cache's valid rows (``share_store`` copies them)."""
        self.store, self.slot = store, slot
        self.keys, self.values = store[0, slot], store[1, slot]  # (capacity, d) each

    @property
    def capacity(self) -> int:
        return self.store.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for this cache (its slot of the store): 2 * capacity * d * b."""
        return 2 * self.keys.numel() * self.keys.element_size()

    @property
    def valid_bytes(self) -> int:
        """Bytes of the valid rows, what a migration moves: 2 * length * d * b."""
        return 2 * self.length * self.keys.shape[-1] * self.keys.element_size()

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` rows in all (one allocation, valid rows kept). A cache in a
        shared store that must grow moves to a store of its own."""
        if capacity > self.capacity:
            store = new_store(1, capacity, self.keys.shape[-1], self.keys.dtype, self.keys.device)
            store[:, 0, :self.length] = self.store[:, self.slot, :self.length]
            self.bind(store, 0)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v: (T, d) at rows length..length+T. Returns views of all valid rows: (S, d)."""
        new_len = self.length + k.shape[0]
        if new_len > self.capacity:
            self.reserve(max(new_len, 2 * self.capacity))
        self.keys[self.length:new_len] = k
        self.values[self.length:new_len] = v
        self.length = new_len
        return self.keys[:new_len], self.values[:new_len]

    def export(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``start..length`` as contiguous (S', d) tensors (for migration)."""
        return self.keys[start:self.length].clone(), self.values[start:self.length].clone()

    def load(self, keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Write (S', d) rows at ``start``, truncating anything after them."""
        if start > self.length:
            raise ValueError(f"cache has {self.length} tokens; cannot load rows starting at {start}")
        self.length = start
        self.append(keys, values)


def shared_store(caches: list[KVCache]) -> torch.Tensor | None:
    """The store the caches share in slots 0..G-1 in order (and nobody else), or None."""
    store = caches[0].store
    if store.shape[1] != len(caches):
        return None
    for slot, cache in enumerate(caches):
        if cache.store is not store or cache.slot != slot:
            return None
    return store


def share_store(caches: list[KVCache], capacity: int) -> torch.Tensor:
    """Re-pack the caches into one new store (2, G, capacity, d), valid rows copied, and make
    each cache a slot of it. ``capacity`` must cover every cache's length."""
    first = caches[0].keys
    store = new_store(len(caches), capacity, first.shape[-1], first.dtype, first.device)
    for slot, cache in enumerate(caches):
        store[:, slot, :cache.length] = cache.store[:, cache.slot, :cache.length]
        cache.bind(store, slot)
    return store
