"""The first re-plan after workers left: keep every block where it is on the workers that
stay, and place only the blocks of the ones that left. Pure and deterministic.

A lost worker's blocks cannot be pulled from it: the head node ships them from its own
weights, and every live session's caches are rebuilt (headnode/recovery.py). Keeping the
other blocks in place means only the lost blocks travel. Each of them goes where the
policy would put it on the remaining workers if it fits there, else to the worker with
the most room. The next regular re-plan (every ``replan_every_tokens``) runs the policy
from scratch, and the head node migrates to that placement live, while decoding goes on.
"""

from __future__ import annotations

from edgeheads.common.spec import ModelShape, block_memory_bytes
from edgeheads.controller.spread import InfeasiblePlacement, Placement, Policy, WorkerCapacity


def lost_workers(previous: Placement, members) -> set[str]:
    """The workers ``previous`` places blocks on that are no longer ``members``."""
    return set(previous.values()) - set(members)


def repair(policy: Policy, shape: ModelShape, workers: list[WorkerCapacity], context_tokens: int, *,
           kept_from: Placement, **extra) -> Placement:
    """``kept_from`` with the blocks of workers not in ``workers`` placed on those that are.
    Falls back to the policy's own placement when a remaining worker no longer has room for
    what it holds; InfeasiblePlacement when the lost blocks fit nowhere."""
    if not workers:
        raise InfeasiblePlacement("no workers are registered")
    names = {w.name for w in workers}
    placement = {b: w for b, w in kept_from.items() if w in names}
    free = {w.name: w.memory_available_bytes for w in workers}
    for block, worker in placement.items():
        free[worker] -= block_memory_bytes(shape, block.kind, context_tokens)
    try:
        preferred = policy(shape, workers, context_tokens, **extra)
    except InfeasiblePlacement:
        preferred = {}
    if any(room < 0 for room in free.values()):  # what stays no longer fits: re-plan from scratch
        if not preferred:
            return policy(shape, workers, context_tokens, **extra)  # raises InfeasiblePlacement
        return preferred
    for block in shape.block_ids():
        if block in placement:
            continue
        need = block_memory_bytes(shape, block.kind, context_tokens)
        choice = preferred.get(block)
        if choice is None or free[choice] < need:
            choice = max(sorted(free), key=lambda n: free[n])
        if free[choice] < need:
            raise InfeasiblePlacement(f"{block} needs {need} bytes; the most free memory on any remaining worker is "
                                      f"{free[choice]} bytes")
        free[choice] -= need
        placement[block] = choice
    return placement
