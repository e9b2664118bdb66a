"""The runtime's simple placement policies. ``spread`` spreads every layer's KV-group blocks over
the workers, keeps proj(l) and ffn(l) together and respects each worker's memory. Pure and
deterministic; the controller looks policies up by name in POLICIES (its default is an
algorithm, ``resource-aware``: controller/config.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgeheads.common.spec import BlockId, BlockKind, ModelShape, block_memory_bytes


@dataclass(frozen=True)
class WorkerCapacity:
    name: str
    memory_available_bytes: int


class InfeasiblePlacement(ValueError):
    """No placement fits the workers' memory; the message says what was short."""


Placement = dict[BlockId, str]
Policy = Callable[[ModelShape, list[WorkerCapacity], int], Placement]


def _placer(shape: ModelShape, workers: list[WorkerCapacity], context_tokens: int):
    """Workers sorted by name, and put(blocks, preferred index): the preferred worker if
    the blocks fit there (weights plus a cache of ``context_tokens``), else the next one
    with room."""
    if not workers:
        raise InfeasiblePlacement("no workers are registered")
    ordered = sorted(workers, key=lambda w: w.name)
    free = {w.name: w.memory_available_bytes for w in ordered}
    placement: Placement = {}

    def put(blocks: list[BlockId], preferred: int) -> None:
        need = sum(block_memory_bytes(shape, b.kind, context_tokens) for b in blocks)
        for k in range(len(ordered)):
            name = ordered[(preferred + k) % len(ordered)].name
            if free[name] >= need:
                free[name] -= need
                placement.update({b: name for b in blocks})
                return
        raise InfeasiblePlacement(f"{', '.join(map(str, blocks))} need {need} bytes; the most free memory on any "
                                  f"worker is {max(free.values())} bytes")
    return len(ordered), placement, put


def spread(shape: ModelShape, workers: list[WorkerCapacity], context_tokens: int) -> Placement:
    """The default: one network phase per layer, heads of every layer on two workers.

    proj(l) + ffn(l) go on worker p(l) = l mod n. The KV groups of layer l alternate
    between p(l-1), which makes the layer's input, and p(l). p(l-1) runs its groups in
    the call that makes x_l and sends x_l with their outputs; p(l) runs the rest, the
    projection and the FFN in one call. So a layer is one phase and one message, and
    with n >= 2 its heads are on two different workers; the layers rotate over all
    workers. (Round trips per layer are what makes head-level splits slow at the edge;
    see docs/decisions.md.)"""
    n, placement, put = _placer(shape, workers, context_tokens)
    for layer in range(shape.n_layers):
        owners = [(layer - 1) % n, layer % n]
        for g in range(shape.n_kv_heads):
            put([BlockId(layer, BlockKind.ATTENTION, g)], owners[(layer + g) % 2])
        put([BlockId(layer, BlockKind.PROJECTION), BlockId(layer, BlockKind.FFN)], layer % n)
    return placement


def round_robin(shape: ModelShape, workers: list[WorkerCapacity], context_tokens: int) -> Placement:
    """Heads of layer l round-robin over the workers other than p(l) = l mod n, which
    holds proj(l) + ffn(l). Two phases per layer (attention, then projection + FFN);
    the groups that land on p(l-1) ride in the call of ffn(l-1).

    Not the simulator's ``block-round-robin`` (baselines.py), which deals every block in
    execution order over all devices."""
    n, placement, put = _placer(shape, workers, context_tokens)
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


POLICIES: dict[str, Policy] = {"spread": spread, "round-robin": round_robin, "single": single}
