"""The pure part of recovering from a lost worker (headnode/recovery.py drives it): which
blocks to unload and load to reach a new placement, what a replay sends over the network,
and the report of one recovery."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeheads.common.spec import BlockId, ModelShape
from edgeheads.headnode.placement_feed import PlacementAnswer
from edgeheads.headnode.relay_plan import relay_plan
from edgeheads.headnode.step_plan import StepPlan


def block_changes(held: dict[str, set[BlockId]], placement: dict[BlockId, str]
                  ) -> tuple[dict[str, list[BlockId]], dict[BlockId, str]]:
    """What turns the blocks the reachable workers hold (``held``) into ``placement``: per
    worker, the blocks it holds that the placement puts elsewhere (to unload), and every
    block whose worker does not hold it yet (to load, with that worker)."""
    unload = {w: sorted(b for b in blocks if placement.get(b) != w) for w, blocks in held.items()}
    load = {b: w for b, w in sorted(placement.items()) if b not in held.get(w, set())}
    return {w: blocks for w, blocks in unload.items() if blocks}, load


def restarted_workers(placement: dict[BlockId, str], held: dict[str, set[BlockId] | None]) -> set[str]:
    """Workers that answer (``held`` not None) but lack blocks ``placement`` puts on them: they
    restarted under the same name, so their blocks and every session's caches there are gone."""
    return {w for w, blocks in held.items()
            if blocks is not None and any(x == w and b not in blocks for b, x in placement.items())}


def capacity_message(answer: PlacementAnswer, lost: set[str]) -> str:
    """What a session ended for lack of room (and every request until a placement fits) is told."""
    losing = f" after losing {', '.join(sorted(lost))}" if lost else ""
    return (f"the remaining workers ({', '.join(sorted(answer.members)) or 'none'}) cannot hold the model{losing}: "
            f"{answer.error}. Requests get this error until a placement fits (a worker joins or gets more memory)")


def value_bytes_per_token(name: str, shape: ModelShape) -> int:
    """Bytes per token of a step value: ``a{l}.{g}`` is one KV group's head outputs, every
    other value (``x{l}``, ``h{l}``) the residual stream."""
    width = shape.heads_per_group * shape.head_dim if name.startswith("a") else shape.hidden_size
    return width * shape.bytes_per_param


def step_bytes_per_token(plan: StepPlan, dataflow: str, shape: ModelShape) -> int:
    """Activation bytes one token of a step puts on the network: in the relay dataflow x0 to
    the workers that read it, every route between workers and the final value back; in the
    head dataflow every call's inputs and returns, through the head node."""
    if dataflow == "relay":
        relay = relay_plan(plan)
        names = [v for values in relay.head_sends.values() for v in values]
        names += [v for calls in relay.programs.values() for call in calls for _, values in call.routes for v in values]
    else:
        names = [v for phase in plan.phases for call in phase.calls for v in (*call.inputs, *call.returns)]
    return sum(value_bytes_per_token(n, shape) for n in names)


@dataclass
class RecoveryReport:
    """One recovery: from the moment the head node knew of the loss to the replayed caches."""

    epoch: int  # the epoch it switched to
    lost: list[str]
    trigger: str
    sessions: int = 0  # live sessions rebuilt
    replayed_steps: int = 0
    replayed_tokens: int = 0
    weights_bytes: int = 0  # weights shipped from the head node
    activation_bytes: int = 0  # activations the replay put on the network (from the plan)
    detect_seconds: float = 0.0  # probing workers and waiting for the controller's placement
    ship_seconds: float = 0.0  # unloading, shipping weights and switching epochs
    replay_seconds: float = 0.0
    restarted: list[str] = field(default_factory=list)  # workers that came back without their blocks

    @property
    def seconds(self) -> float:
        return self.detect_seconds + self.ship_seconds + self.replay_seconds

    @property
    def bytes_moved(self) -> int:
        return self.weights_bytes + self.activation_bytes
