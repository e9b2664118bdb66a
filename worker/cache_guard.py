"""A worker's last line against running out of memory: before a call allocates K/V cache
stores, the bytes it will allocate must fit the worker's memory budget, or the host refuses
the call with RESOURCE_EXHAUSTED and nothing changes.

The head node admits a session only when its reservation fits every worker holding its
blocks (headnode/admission.py), so a worker normally never refuses. This guard covers what
the head node cannot see: a reservation-less or overlong session whose cache grows by
doubling, another process taking the board's memory, a limit lowered at runtime, a
request that names an absurd reservation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from edgeheads.worker import telemetry
from edgeheads.worker.blocks.attention import AttentionBlock, planned_capacity
from edgeheads.worker.blocks.kv_cache import KVCache, store_bytes
from edgeheads.worker.executor import CallUnit

if TYPE_CHECKING:
    from edgeheads.worker.host import BlockHost


def call_cache_bytes(units: Iterable[CallUnit], session: str, needed: int, reserve_tokens: int,
                     held: Iterable[KVCache] = ()) -> int:
    """Bytes of the cache stores a call's attention units will allocate for ``session``
    when its caches must hold ``needed`` rows (position + the call's tokens), less the old
    stores a re-pack or a growth frees: those only the unit's own caches use (``held``: all
    of the session's caches on the worker). A re-pack after a migration took a block out
    of a shared store frees more than it allocates."""
    held = list(held)
    total = 0
    for unit in units:
        if unit.group is None:
            continue
        blocks = unit.group.blocks
        capacity = planned_capacity(blocks, session, needed, reserve_tokens)
        if capacity is None:
            continue
        first = blocks[0]
        total += store_bytes(len(blocks), capacity, first.shape.head_dim, first.dtype.itemsize)
        mine = [b.caches[session] for b in blocks if session in b.caches]
        for store in {id(c.store): c.store for c in mine}.values():
            if all(c.store is not store or any(c is m for m in mine) for c in held):
                total -= store.numel() * store.element_size()
    return total


def shortfall_message(worker: str, session: str, new_bytes: int, used_bytes: int, budget_bytes: int,
                      reserve_tokens: int) -> str:
    """Why a call was refused: what did not fit where."""
    reserved = f" (a reservation of {reserve_tokens} tokens)" if reserve_tokens else ""
    return (f"worker {worker}: the K/V caches of session {session!r} need {new_bytes} more bytes{reserved}, "
            f"but {used_bytes} of its {budget_bytes}-byte memory budget are in use")


def cache_shortfall(host: BlockHost, units: Iterable[CallUnit], session: str, needed: int,
                    reserve_tokens: int) -> str | None:
    """Why the call's cache allocations would take the worker past its budget (the lowest of
    its memory limit, the cgroup's headroom and the memory the OS has available:
    telemetry.memory_capacity_bytes), or None when they fit. The host refuses the call with
    RESOURCE_EXHAUSTED and this message."""
    units = list(units)
    if all(u.group is None or planned_capacity(u.group.blocks, session, needed, reserve_tokens) is None
           for u in units):
        return None  # nothing to allocate: the common case, decided without walking the host's caches
    held = [b.caches[session] for b in host.blocks.values() if isinstance(b, AttentionBlock) and session in b.caches]
    new_bytes = call_cache_bytes(units, session, needed, reserve_tokens, held)
    if new_bytes <= 0:
        return None
    used = host.memory_used_bytes()
    budget = telemetry.memory_capacity_bytes(host.memory_limit_bytes, used)
    if used + new_bytes <= budget:
        return None
    return shortfall_message(host.name, session, new_bytes, used, budget, reserve_tokens)
