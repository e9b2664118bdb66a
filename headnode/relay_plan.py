"""Turn a StepPlan into per-worker programs for relay mode (a pure function).

In relay mode the head node leaves the data path: it sends ``x0`` to the workers
that read it, the workers pass every other value straight to the worker that needs
it, and the worker that makes the final value sends it back. Each worker gets, once
per epoch, the list of its calls in execution order. A call names the values that
must arrive before it runs (``inputs``), the outputs it keeps for its own later
calls or sends on (``keep``), and one route per destination (one message per
destination per call, as in head-routed mode).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeheads.headnode.step_plan import Op, StepPlan

HEAD_NODE = ""  # the destination name of the head node in routes


@dataclass(frozen=True)
class RelayCall:
    ops: tuple[Op, ...]
    inputs: tuple[str, ...]
    keep: tuple[str, ...]
    routes: tuple[tuple[str, tuple[str, ...]], ...]  # (destination worker or HEAD_NODE, values)


@dataclass(frozen=True)
class RelayPlan:
    programs: dict[str, list[RelayCall]]  # worker -> calls in execution order
    head_sends: dict[str, tuple[str, ...]]  # worker -> values the head node sends it each step
    final: str
    final_worker: str
    phases: int  # sequential network phases per step, as in head-routed mode

    def messages(self) -> int:
        """Messages per step, counting the head node's and the final reply."""
        return len(self.head_sends) + sum(len(c.routes) for calls in self.programs.values() for c in calls)


def relay_plan(plan: StepPlan) -> RelayPlan:
    calls = [c for phase in plan.phases for c in phase.calls]  # execution order
    consumers: dict[str, set[str]] = {}  # value -> workers whose calls read it from elsewhere
    for call in calls:
        for value in call.inputs:
            consumers.setdefault(value, set()).add(call.worker)
    programs: dict[str, list[RelayCall]] = {}
    final_worker = ""
    for call in calls:
        routes: dict[str, list[str]] = {}
        keep: list[str] = []
        for op in call.ops:
            readers = consumers.get(op.output, set())
            if op.output == plan.final:
                final_worker = call.worker
                routes.setdefault(HEAD_NODE, []).append(op.output)
            for worker in sorted(readers - {call.worker}):
                routes.setdefault(worker, []).append(op.output)
            if readers or op.output == plan.final:
                keep.append(op.output)
        programs.setdefault(call.worker, []).append(RelayCall(
            tuple(call.ops), tuple(call.inputs), tuple(keep),
            tuple((dest, tuple(values)) for dest, values in routes.items())))
    head_sends = {w: ("x0",) for w in sorted(consumers.get("x0", set()))}
    return RelayPlan(programs, head_sends, plan.final, final_worker, len(plan.phases))
