"""What the controller publishes and decides, as plain records: placement epochs, the
snapshot one solve reads, and the decisions `edgeheads status` lists."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeheads.controller.spread import InfeasiblePlacement, Placement, WorkerCapacity
from edgeheads.common.spec import ModelShape


@dataclass(frozen=True)
class PlanDecision:
    """One published epoch, for `edgeheads status` and the logs."""

    epoch: int
    unix_time: float
    reason: str
    policy: str
    blocks_moved: int
    blocks_per_worker: dict[str, int]
    predicted_token_seconds: float | None  # the cost model's estimate (links assumed, see controller/live.py)
    calibrated: bool = False  # the estimate used measured timings (controller/calibration.py)


@dataclass(frozen=True)
class PlanInputs:
    """What one placement solve reads, copied from the cluster state (see ClusterState.plan_inputs)."""

    policy: Callable[..., Placement]
    shape: ModelShape
    capacities: list[WorkerCapacity]
    context_tokens: int
    addresses: dict[str, str]  # worker name -> address when the snapshot was taken
    extra: dict[str, Any]  # "previous" and "live" for the policies that use them


def solve_plan(inputs: PlanInputs) -> Placement | InfeasiblePlacement:
    """Run the policy on a snapshot; touches no shared state, so it may run in a worker thread."""
    try:
        return inputs.policy(inputs.shape, inputs.capacities, inputs.context_tokens, **inputs.extra)
    except InfeasiblePlacement as err:
        return err


@dataclass
class PlacementEpoch:
    epoch: int
    placement: Placement
    addresses: dict[str, str]
    policy: str
    error: str = ""
    members: tuple[str, ...] = ()  # the workers it was planned for (with an error: that did not fit)
