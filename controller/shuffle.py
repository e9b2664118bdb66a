"""The "shuffle" test policy: every re-plan moves a few random blocks of the previous
placement to another worker. It exists to exercise live migration (tests, chaos
runs), not to place well. Seeded, so a run can be repeated."""

from __future__ import annotations

import random

from edgeheads.controller.spread import InfeasiblePlacement, Placement, WorkerCapacity, spread
from edgeheads.common.spec import ModelShape, block_memory_bytes


class Shuffle:
    uses_previous = True

    def __init__(self, moves: int = 2, seed: int = 0) -> None:
        self.moves = moves
        self.rng = random.Random(seed)

    def __call__(self, shape: ModelShape, workers: list[WorkerCapacity], context_tokens: int,
                 previous: Placement | None = None) -> Placement:
        names = sorted(w.name for w in workers)
        if not previous or not set(previous.values()) <= set(names):
            return spread(shape, workers, context_tokens)  # first plan, or a worker left
        if len(names) < 2:
            return dict(previous)
        free = {w.name: w.memory_available_bytes for w in workers}
        for block, worker in previous.items():
            free[worker] -= block_memory_bytes(shape, block.kind, context_tokens)
        placement = dict(previous)
        blocks = sorted(placement)
        for block in self.rng.sample(blocks, min(self.moves, len(blocks))):
            need = block_memory_bytes(shape, block.kind, context_tokens)
            options = [n for n in names if n != placement[block] and free[n] >= need]
            if not options:
                continue
            target = self.rng.choice(options)
            free[placement[block]] += need
            free[target] -= need
            placement[block] = target
        if placement == previous and any(free[n] < 0 for n in names):
            raise InfeasiblePlacement("no worker has room to take a block")
        return placement
