"""Relay mode on a worker: run this worker's program for each step as its inputs
arrive, and say where each output goes. Free of gRPC; the servicer feeds it values
and sends what it yields.

A step is keyed by (session, epoch, position). Values for it may arrive from the
head node and from several peers in any order; each call runs, in program order,
as soon as all its inputs are present. A call runs in segments that end where a
route's last value is made, so a destination gets its message as early as possible
(the peer starts computing while this worker finishes the call) and still gets one
message per call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from edgeheads.worker.host import BlockHost, CompiledCall, HostError, OpSpec


@dataclass(frozen=True)
class ProgramCall:
    ops: list[OpSpec]
    inputs: list[str]
    keep: list[str]
    routes: dict[str, list[str]]  # destination ("" = head node) -> values


@dataclass(frozen=True)
class Segment:
    ops: list[OpSpec]
    inputs: list[str]  # values it reads that it does not make
    returns: list[str]  # values later segments, later calls or routes need
    routes: list[tuple[str, list[str]]]  # routes complete after this segment
    compiled: CompiledCall | None = None  # set when the program is installed


@dataclass
class _Step:
    next_call: int = 0
    running: bool = False
    path_compute: float = 0.0  # compute seconds on the longest chain of calls so far
    reserve_tokens: int = 0  # the session's reservation, as its batches carry it
    values: dict[str, torch.Tensor] = field(default_factory=dict)


class Outgoing(NamedTuple):
    messages: list[tuple[str, dict[str, torch.Tensor]]]  # (destination, values); "" is the head node
    path_compute: float  # compute seconds on the step's critical path so far


def segments(call: ProgramCall) -> list[Segment]:
    """Split a call after each op that completes a route (and after its last op)."""
    made_at = {op.output: i for i, op in enumerate(call.ops)}
    route_end = {dest: max(made_at[n] for n in names) for dest, names in call.routes.items()}
    ends = sorted(set(route_end.values()) | {len(call.ops) - 1})
    out: list[Segment] = []
    start = 0
    for end in ends:
        ops = call.ops[start:end + 1]
        made = {op.output for op in ops}
        later_reads = {n for op in call.ops[end + 1:] for n in op.inputs}
        inputs = list(dict.fromkeys(n for op in ops for n in op.inputs if n not in made))
        returns = [op.output for op in ops if op.output in set(call.keep) | later_reads]
        routes = [(d, names) for d, names in call.routes.items() if start <= route_end[d] <= end]
        out.append(Segment(ops, inputs, returns, routes))
        start = end + 1
    return out


class RelayExecutor:
    def __init__(self, host: BlockHost, max_pending_steps: int = 4096, epochs_kept: int = 4) -> None:
        self.host = host
        self.programs: dict[int, list[tuple[ProgramCall, list[Segment]]]] = {}
        self.expected: dict[int, set[str]] = {}  # epoch -> names the program reads from outside
        self.steps: dict[tuple[str, int, int], _Step] = {}
        self.max_pending_steps = max_pending_steps
        self.epochs_kept = epochs_kept

    def install(self, epoch: int, calls: list[ProgramCall]) -> None:
        """Check the program against the blocks held here, then keep it for ``epoch``."""
        if not calls:
            raise HostError("INVALID_ARGUMENT", f"epoch {epoch}: empty program")
        for i, call in enumerate(calls):
            if not call.ops:
                raise HostError("INVALID_ARGUMENT", f"epoch {epoch}: call {i} has no ops")
            outputs = {op.output for op in call.ops}
            for name in call.keep:
                if name not in outputs:
                    raise HostError("INVALID_ARGUMENT", f"epoch {epoch}: call {i} keeps {name!r}, "
                                    "which none of its ops makes")
            for dest, names in call.routes.items():
                if not names:
                    raise HostError("INVALID_ARGUMENT", f"epoch {epoch}: call {i} routes no values to {dest!r}")
                if dest == self.host.name:
                    raise HostError("INVALID_ARGUMENT", f"epoch {epoch}: call {i} routes values to itself")
                missing = [n for n in names if n not in call.keep]
                if missing:
                    raise HostError("INVALID_ARGUMENT", f"epoch {epoch}: call {i} routes {missing} without "
                                    "keeping them")
        # NOT_FOUND if a block is not here; INVALID_ARGUMENT for an op that reads nothing known
        self.programs[epoch] = [(call, [replace(seg, compiled=self.host.compile_call(seg.ops, seg.inputs, seg.returns))
                                        for seg in segments(call)]) for call in calls]
        self.expected[epoch] = {n for c in calls for n in c.inputs}
        for old in sorted(self.programs)[:-self.epochs_kept]:
            del self.programs[old], self.expected[old]

    def deliver(self, session: str, epoch: int, position: int, values: dict[str, torch.Tensor],
                path_compute: float = 0.0, reserve_tokens: int = 0) -> Iterator[Outgoing]:
        """Add values to a step and run what became ready, yielding the messages to send
        after each segment. Values that arrive while the step runs join it.

        On a HostError the step is discarded (the caller reports it to the head node,
        which ends the session)."""
        program = self.programs.get(epoch)
        if program is None:
            raise HostError("FAILED_PRECONDITION", f"worker {self.host.name} has no program for epoch {epoch}")
        unexpected = [n for n in values if n not in self.expected[epoch]]
        if unexpected:
            raise HostError("INVALID_ARGUMENT", f"epoch {epoch} on {self.host.name} does not read {unexpected}")
        key = (session, epoch, position)
        step = self.steps.get(key)
        if step is None:
            self.host.check_live(session)  # a late batch of an ended session starts nothing
            if len(self.steps) >= self.max_pending_steps:
                raise HostError("RESOURCE_EXHAUSTED", f"{self.host.name} has {len(self.steps)} steps waiting "
                                "for inputs")
            step = self.steps[key] = _Step()
        step.values.update(values)
        step.path_compute = max(step.path_compute, path_compute)
        step.reserve_tokens = max(step.reserve_tokens, reserve_tokens)
        if step.running:  # the delivery already running this step will see the new values
            return
        step.running = True
        try:
            while step.next_call < len(program) and all(n in step.values for n in program[step.next_call][0].inputs):
                for seg in program[step.next_call][1]:
                    inputs = {n: step.values[n] for n in seg.inputs}
                    t0 = time.perf_counter()
                    step.values.update(self.host.run_compiled(session, position, inputs, seg.compiled,
                                                              step.reserve_tokens))
                    step.path_compute += time.perf_counter() - t0
                    if seg.routes:
                        yield Outgoing([(dest, {n: step.values[n] for n in names}) for dest, names in seg.routes],
                                       step.path_compute)
                step.next_call += 1
        except BaseException:
            self.steps.pop(key, None)
            raise
        step.running = False
        if step.next_call == len(program):
            self.steps.pop(key, None)

    def drop_session(self, session: str) -> int:
        keys = [k for k in self.steps if k[0] == session]
        for key in keys:
            del self.steps[key]
        return len(keys)
