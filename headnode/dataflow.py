"""How a step's values travel between the workers: the Dataflow interface, and the
counters both dataflows keep.

A step runs as phases of calls (the vocabulary is defined in headnode/step_plan.py:
StepPlan -> Phase -> Call -> Op). The head node embeds the tokens (x0) and turns the
final value into logits; a dataflow carries everything in between:

- ``head`` (headnode/head_dataflow.py): the head node sends every call its inputs and
  reads back its outputs, one round trip per phase;
- ``relay`` (headnode/relay_dataflow.py): the head node sends x0 and waits; workers
  pass values to each other and the last one returns the final value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from edgeheads.headnode.metrics import HeadnodeMetrics
from edgeheads.v1 import worker_pb2_grpc

if TYPE_CHECKING:
    from edgeheads.headnode.sessions import Epoch

DATAFLOWS = ("relay", "head")


class Dataflow(Protocol):
    label: str  # "relay" or "head": the metrics label
    name: str  # as status shows it: "relay/tcp", "relay/grpc", "head"

    async def switch(self, epoch: Epoch) -> None:
        """Get ready to run ``epoch``'s steps and use it from now on. Called between steps
        (under the StepGate's exclusive hold); on failure nothing changes."""

    async def step(self, session: str, position: int, x0: torch.Tensor, reserve_tokens: int = 0) -> torch.Tensor:
        """Run one step of ``session`` from ``position`` under the current epoch; the final
        value (the last layer's output). Raises ClusterError when a worker fails it.
        ``reserve_tokens``: the session's reservation, which the workers allocate its caches for."""

    async def forget(self, session: str) -> None:
        """Close what the dataflow keeps for ``session`` (not its caches: SessionTable.end)."""

    async def close(self) -> None: ...


class StepStats:
    """Phase counters (for Status) and Prometheus metrics (when given)."""

    def __init__(self, metrics: HeadnodeMetrics | None = None) -> None:
        self.metrics = metrics
        self.phases_run = 0
        self.phase_seconds_total = 0.0
        self.phase_compute_seconds_total = 0.0  # the slowest call's compute, per phase

    def phase(self, label: str, seconds: float, compute_seconds: float) -> None:
        """One phase run through the head node."""
        self.phases_run += 1
        self.phase_seconds_total += seconds
        self.phase_compute_seconds_total += compute_seconds
        if self.metrics is not None:
            self.metrics.phase.labels(label).observe(seconds)

    def path(self, label: str, phases: int, seconds: float, path_compute_seconds: float) -> None:
        """A step's ``phases`` run from worker to worker, timed only as a whole."""
        self.phases_run += phases
        self.phase_seconds_total += seconds
        self.phase_compute_seconds_total += path_compute_seconds
        if self.metrics is not None:
            for _ in range(phases):
                self.metrics.phase.labels(label).observe(seconds / phases)
            self.metrics.step_compute.observe(path_compute_seconds)
            self.metrics.step_network.observe(max(0.0, seconds - path_compute_seconds))

    def step(self, label: str, tokens: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.step.labels(label).observe(seconds)
            self.metrics.tokens.inc(tokens)


def make_dataflow(kind: str, stubs: dict[str, worker_pb2_grpc.WorkerStub], stats: StepStats,
                  step_timeout_seconds: float, relay_transport: str = "tcp",
                  max_message_bytes: int = 64 << 20) -> Dataflow:
    if kind == "head":
        from edgeheads.headnode.head_dataflow import HeadDataflow
        return HeadDataflow(stubs, stats, step_timeout_seconds)
    if kind == "relay":
        from edgeheads.headnode.relay_dataflow import RelayDataflow
        return RelayDataflow(stubs, stats, step_timeout_seconds, relay_transport, max_message_bytes)
    raise ValueError(f"dataflow must be one of {', '.join(map(repr, DATAFLOWS))}, not {kind!r}")
