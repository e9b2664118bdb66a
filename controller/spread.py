"""The runtime's default placement policy: spread every layer's KV-group blocks over the
workers, keep proj(l) and ffn(l) together, respect each worker's memory. Pure and
deterministic; the controller looks policies up by name in POLICIES."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgeheads.worker.blocks.spec import BlockId, BlockKind, ModelShape, block_memory_bytes


@dataclass(frozen=True)
class WorkerCapacity:
    name: str
    memory_available_bytes: int


class InfeasiblePlacement(ValueError):
    """No placement fits the workers' memory; the message says what was short."""


Placement = dict[BlockId, str]
Policy = Callable[[ModelShape, list[WorkerCapacity], int], Placement]


def spread(shape: ModelShape, workers: list[WorkerCapacity], context_tokens: int) -> Placement:
    """Layer l puts proj(l) + ffn(l) on worker p = l mod n and its KV groups round-robin
    over the *other* workers (workers sorted by name; with one worker, on it).

    Keeping the projection worker free of its own layer's attention matters for the
    stage plan: the groups that land on p(l-1) run in the same call as ffn(l-1), so
    with three workers each layer costs one attention call and one projection call,
    still with the heads of every layer on different workers (when n > 2). A block that
    does not fit its preferred worker (weights plus a cache of ``context_tokens``) goes to
    the next worker with room."""
    if not workers:
        raise InfeasiblePlacement("no workers are registered")
    ordered = sorted(workers, key=lambda w: w.name)
    free = {w.name: w.memory_available_bytes for w in ordered}
    n = len(ordered)
    placement: Placement = {}

    def put(blocks: list[BlockId], preferred: int) -> None:
        need = sum(block_memory_bytes(shape, b.kind, context_tokens) for b in blocks)
        for k in range(n):
            name = ordered[(preferred + k) % n].name
            if free[name] >= need:
                free[name] -= need
                placement.update({b: name for b in blocks})
                return
        raise InfeasiblePlacement(f"{', '.join(map(str, blocks))} need {need} bytes; the most free memory on any "
                                  f"worker is {max(free.values())} bytes")

    for layer in range(shape.n_layers):
        proj = layer % n
        others = [i for i in range(n) if i != proj] or [proj]
        for g in range(shape.n_kv_heads):
            put([BlockId(layer, BlockKind.ATTENTION, g)], others[(layer + g) % len(others)])
        put([BlockId(layer, BlockKind.PROJECTION), BlockId(layer, BlockKind.FFN)], proj)
    return placement


def single(shape: ModelShape, workers: list[WorkerCapacity], context_tokens: int) -> Placement:
    """Everything on the worker with the most memory (a baseline and a debugging aid)."""
    if not workers:
        raise InfeasiblePlacement("no workers are registered")
    best = max(sorted(workers, key=lambda w: w.name), key=lambda w: w.memory_available_bytes)
    need = sum(block_memory_bytes(shape, b.kind, context_tokens) for b in shape.block_ids())
    if need > best.memory_available_bytes:
        raise InfeasiblePlacement(f"the model needs {need} bytes; the largest worker has {best.memory_available_bytes}")
    return {b: best.name for b in shape.block_ids()}


POLICIES: dict[str, Policy] = {"spread": spread, "single": single}
