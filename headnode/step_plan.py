"""Compile a placement into the phases of one forward step (a pure function).

The step vocabulary, defined here and used everywhere (code, protos, docs):

- a **step** feeds new tokens of one session (the prompt, then one token at a time)
  through every block and gives the logits of the last one;
- a step runs as **phases**: a phase is one network hop, and in it each worker that has
  work runs the blocks it holds for that phase in one **call** (the ``RunCall`` RPC in
  head dataflow, a program call in relay dataflow);
- an **op** is one block's invocation inside a call.

Relay-only words: a worker's calls of an epoch, installed once, are its *program*; a
call's outputs leave in *segments*, as soon as a destination's values exist.

A step is a dataflow over named values: ``x{l}`` is the residual stream entering
layer l (``x0`` comes from the head node's embedding), ``a{l}.{g}`` the outputs of
KV group g's heads, ``h{l}`` the residual after the projection. Ops run in model
order; the compiler packs them into phases of calls (one message to one worker,
running several ops back to back):

- an op runs in the earliest phase where its inputs exist: in the same call as the
  op that made an input on the same worker, or in the phase after an input made on
  another worker (which the head node forwards);
- it joins its worker's call in that phase, or opens one (one call per worker per phase).

With the attention groups of a layer on the workers other than the one holding
proj(l)/ffn(l) this gives two phases per layer (attention, then projection + FFN);
with the groups on the workers that make and that project the layer's input, one
phase per layer; when one worker holds a whole stretch of layers it runs as a single
call. The plan is data: headnode/relay_plan.py turns it into per-worker programs for
the relay dataflow, where the head node is out of the data path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgeheads.common.spec import BlockId, BlockKind, ModelShape

HEAD = "<head>"


@dataclass(frozen=True)
class Op:
    block: BlockId
    inputs: tuple[str, ...]  # attn: (x,); proj: (x, a.0, a.1, ...); ffn: (h,)
    output: str


@dataclass
class Call:
    worker: str
    ops: list[Op] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # values the head node sends
    returns: list[str] = field(default_factory=list)  # values the worker sends back


@dataclass
class Phase:
    calls: list[Call] = field(default_factory=list)

    def call_for(self, worker: str) -> Call | None:
        return next((c for c in self.calls if c.worker == worker), None)


@dataclass
class StepPlan:
    phases: list[Phase]
    final: str  # the value the LM head reads

    @property
    def workers(self) -> list[str]:
        return sorted({c.worker for p in self.phases for c in p.calls})

    def phases_per_layer(self, n_layers: int) -> float:
        return len(self.phases) / n_layers

    def messages(self) -> int:
        return sum(len(p.calls) for p in self.phases)


def model_ops(shape: ModelShape) -> list[Op]:
    """Every block invocation of one forward pass, in execution order."""
    ops: list[Op] = []
    for block in shape.block_ids():
        layer, x = block.layer, f"x{block.layer}"
        if block.kind is BlockKind.ATTENTION:
            ops.append(Op(block, (x,), f"a{layer}.{block.kv_group}"))
        elif block.kind is BlockKind.PROJECTION:
            heads = tuple(f"a{layer}.{g}" for g in range(shape.n_kv_heads))
            ops.append(Op(block, (x, *heads), f"h{layer}"))
        else:
            ops.append(Op(block, (f"h{layer}",), f"x{layer + 1}"))
    return ops


def compile_plan(shape: ModelShape, placement: Mapping[BlockId, str]) -> StepPlan:
    """placement maps every BlockId of ``shape`` to a worker name."""
    missing = [str(b) for b in shape.block_ids() if b not in placement]
    if missing:
        raise ValueError(f"placement leaves {len(missing)} blocks unplaced, e.g. {missing[:3]}")
    phases: list[Phase] = []
    produced_in: dict[str, tuple[int, str]] = {"x0": (-1, HEAD)}  # value -> (phase index, worker)
    for op in model_ops(shape):
        worker = placement[op.block]
        # earliest phase this op can run in: with a value made on its own worker, that call;
        # with a value made elsewhere (or by the head node), the phase after it
        index = max(max(p if w == worker else p + 1 for p, w in (produced_in[v] for v in op.inputs)), 0)
        if index == len(phases):
            phases.append(Phase())
        call = phases[index].call_for(worker)
        if call is None:
            call = Call(worker)
            phases[index].calls.append(call)
        call.ops.append(op)
        produced_in[op.output] = (index, worker)
    final = f"x{shape.n_layers}"
    _wire_values(phases, final)
    return StepPlan(phases, final)


def _wire_values(phases: list[Phase], final: str) -> None:
    """Fill each call's inputs (sent by the head node) and returns (sent back)."""
    produced_by: dict[str, int] = {}
    calls = [c for p in phases for c in p.calls]
    for i, call in enumerate(calls):
        for op in call.ops:
            produced_by[op.output] = i
    needed_elsewhere = {final}
    for i, call in enumerate(calls):
        local: set[str] = set()
        for op in call.ops:
            for v in op.inputs:
                if v not in local and v not in call.inputs:
                    call.inputs.append(v)
                    needed_elsewhere.add(v)
            local.add(op.output)
    for i, call in enumerate(calls):
        call.returns = [op.output for op in call.ops if op.output in needed_elsewhere]
