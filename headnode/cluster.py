"""The head node's side of the distributed runtime.

ClusterExecutor composes one part per concern:
- weights (headnode/weights.py): ship each block its worker lacks, content-addressed;
- epochs and sessions (headnode/sessions.py): the placement in use, the live sessions,
  and the one cleanup path every ending session takes;
- a dataflow (headnode/dataflow.py: ``relay`` or ``head``) that runs a step's phases;
- metrics (StepStats, and the Prometheus metrics when given);
- recovery (headnode/recovery.py), when something can tell it placements: a step that
  fails because a worker was lost is retried once the sessions are rebuilt without it;
- admission (headnode/admission_control.py): a session reserves its K/V memory before its
  first step (``admit``), and workers allocate its caches for that many tokens at once.
A *step* feeds a session's new tokens through the model: the head node embeds them,
the dataflow runs the step's phases on the workers, and the head node turns the final
value into the last token's logits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from edgeheads.common.config import GrpcSettings
from edgeheads.common.spec import BlockId
from edgeheads.headnode.admission_control import Admission
from edgeheads.headnode.channels import WorkerChannels
from edgeheads.headnode.cluster_errors import ClusterError, cancelled_here
from edgeheads.headnode.dataflow import Dataflow, StepStats, make_dataflow
from edgeheads.headnode.head import HeadNodeCompute
from edgeheads.headnode.metrics import HeadnodeMetrics
from edgeheads.headnode.sessions import Epoch, Session, SessionTable
from edgeheads.headnode.slicing import ModelParts
from edgeheads.headnode.step_plan import compile_plan
from edgeheads.headnode.step_gate import StepGate
from edgeheads.headnode.weights import BlockWeights
from edgeheads.v1 import worker_pb2_grpc

if TYPE_CHECKING:
    from edgeheads.headnode.recovery import Recovery

__all__ = ["ClusterError", "ClusterExecutor", "Epoch"]

log = logging.getLogger(__name__)

RETRIES_PER_STEP = 3  # recoveries one step may wait for before its failure stands
HEAD_GAP_SECONDS = 1.0  # more than this between a session's steps, beyond the step itself: not one decode loop


@dataclass(frozen=True)
class StepTiming:
    """One step that succeeded, as reported to the controller (ProgressReport)."""

    tokens: int
    seconds: float  # the whole step: dataflow and LM head
    epoch: int
    dataflow_seconds: float
    head_seconds: float  # the head node's own time per token around the dataflow; 0 when unknown
    context_tokens: int


class ClusterExecutor:
    def __init__(self, parts: ModelParts, grpc_settings: GrpcSettings | None = None, dataflow: str = "relay",
                 step_timeout_seconds: float = 60.0, metrics: HeadnodeMetrics | None = None,
                 relay_transport: str = "tcp", max_sessions: int | None = None) -> None:
        self.parts = parts
        self.shape = parts.shape
        self.head = HeadNodeCompute(parts.shape, parts.head)
        self.grpc_settings = grpc_settings or GrpcSettings()
        self.metrics = metrics
        self.stats = StepStats(metrics)
        self.channels = WorkerChannels(self.grpc_settings)
        self.weights = BlockWeights(parts, self.grpc_settings.chunk_bytes)
        self.dataflow: Dataflow = make_dataflow(dataflow, self.channels.stubs, self.stats, step_timeout_seconds,
                                                relay_transport, self.grpc_settings.max_message_bytes)
        self.sessions = SessionTable(self.channels.stubs, self.dataflow.forget)
        self.admission = Admission(parts, self.channels.stubs, max_sessions, metrics)
        self.gate = StepGate()  # steps run concurrently; an epoch switch holds them back
        self.epoch: Epoch | None = None
        self.on_step: Callable[[StepTiming], None] | None = None  # after every step that succeeded
        self.placement_lock = asyncio.Lock()  # one placement change at a time: a migration or a recovery
        self.recovery: Recovery | None = None  # set by what follows the controller (ControllerLink)
        self.rebuilds = 0  # completed recoveries: a step that began before one is retried
        self.down: ClusterError | None = None  # why no step can run now (the workers cannot hold the model)
        self.failed: dict[str, ClusterError] = {}  # sessions a recovery ended -> why, for their next step

    # ------------------------------------------------------------------ what others read
    @property
    def stubs(self) -> dict[str, worker_pb2_grpc.WorkerStub]:
        return self.channels.stubs

    def stub(self, worker: str, address: str) -> worker_pb2_grpc.WorkerStub:
        return self.channels.stub(worker, address)

    @property
    def dataflow_name(self) -> str:
        return self.dataflow.name

    @property
    def phases_run(self) -> int:
        return self.stats.phases_run

    @property
    def phase_seconds_total(self) -> float:
        return self.stats.phase_seconds_total

    @property
    def phase_compute_seconds_total(self) -> float:
        return self.stats.phase_compute_seconds_total

    # ------------------------------------------------------------------ epochs
    async def apply_placement(self, number: int, placement: dict[BlockId, str], addresses: dict[str, str],
                              progress: bool = True) -> None:
        """Ship every block its worker lacks (content-addressed), then switch to the epoch."""
        self.channels.connect(addresses)
        await self.weights.ship(placement, self.channels.stubs, progress)
        await self.switch_epoch(number, placement, addresses)

    async def switch_epoch(self, number: int, placement: dict[BlockId, str], addresses: dict[str, str]) -> None:
        """Start using a placement whose blocks are all in place. Nothing changes if this
        fails (a worker refused the program or is gone). Call it between steps: migrations
        hold ``self.gate`` exclusively around it."""
        self.channels.connect(addresses)
        epoch = Epoch(number, dict(placement), dict(addresses), compile_plan(self.shape, placement))
        await self.dataflow.switch(epoch)
        self.epoch = epoch
        if self.metrics is not None:
            self.metrics.epoch.set(number)
        log.info("epoch %d (%s dataflow): %d blocks on %d workers, %d phases per step (%d calls)", number,
                 self.dataflow.name, len(placement), len(set(placement.values())), len(epoch.plan.phases),
                 epoch.plan.messages())

    # ------------------------------------------------------------------ steps and sessions
    async def admit(self, session: str, prompt_tokens: int, max_new_tokens: int) -> int:
        """Reserve K/V memory for a session of ``prompt_tokens + max_new_tokens`` on the workers
        of the epoch in use, before its first step; the tokens reserved. RESOURCE_EXHAUSTED
        (an AdmissionError, or ``down``) when it does not fit. ``end_session`` releases it."""
        if self.down is not None:
            raise self.down
        if self.epoch is None:
            raise ClusterError("no placement is in use yet")
        return await self.admission.admit(session, prompt_tokens, max_new_tokens, self.epoch.placement)

    async def step(self, session: str, token_ids: list[int]) -> torch.Tensor:
        """Feed new tokens for ``session`` through every phase; logits of the last token (V,).

        Every step runs under one epoch: an epoch switch waits for steps in flight. A step
        that fails because a worker was lost waits for the recovery (which rebuilds every
        live session without it) and runs again; any other failure ends its session (its
        caches are dropped everywhere) and raises."""
        for attempt in range(RETRIES_PER_STEP + 1):
            async with self.gate.step():
                failure = self.failed.pop(session, None) or self.down
                if failure is not None:
                    raise failure
                epoch = self.epoch
                if epoch is None:
                    raise ClusterError("no placement is in use yet")
                record = self.sessions.open(session, epoch)
                rebuilds = self.rebuilds
                start = time.perf_counter()
                try:
                    final = await self.run(record, token_ids)
                    ran = time.perf_counter() - start
                except ClusterError as err:
                    failure = err
                except asyncio.CancelledError as err:
                    if cancelled_here():  # its client went away
                        await self._end_cancelled(session)  # already inside the gate
                        raise
                    # a call cut off by its channel closing (grpc.aio raises CancelledError): a failed call
                    failure = ClusterError(f"a worker call was cut off: {err or 'channel closed'}")
                except BaseException:
                    await self._end_cancelled(session)
                    raise
                else:
                    record.history.append(tuple(token_ids))
                    logits = self.head.logits(final)
                    end = time.perf_counter()
                    elapsed = end - start
                    self.stats.step(self.dataflow.label, len(token_ids), elapsed)
                    # the head node's own time per token: since this session's previous step, less
                    # this step's dataflow (only for a decode step following one closely)
                    since = end - record.last_step_end if record.last_step_end else 0.0
                    head = since - ran if len(token_ids) == 1 and 0 < since - ran < HEAD_GAP_SECONDS else 0.0
                    record.last_step_end = end
                    if self.on_step is not None:
                        self.on_step(StepTiming(len(token_ids), elapsed, epoch.number, ran, max(0.0, head),
                                                record.position))
                    return logits
            # out of the gate: a recovery holds it exclusively
            retry = False
            if self.recovery is not None and attempt < RETRIES_PER_STEP:
                try:
                    retry = await self.recovery.after_failure(session, rebuilds, failure)
                except ClusterError as err:
                    failure = err
            if not retry:
                await self.end_session(session)
                raise failure
        raise AssertionError("unreachable")

    async def run(self, session: Session, token_ids) -> torch.Tensor:
        """Feed ``token_ids`` at the session's position under the current epoch; the final value.
        The caller holds the gate (a step, or a recovery's exclusive hold)."""
        x0 = self.head.embed(torch.as_tensor(token_ids, dtype=torch.long), session.position)
        final = await self.dataflow.step(session.wire, session.position, x0, self.admission.tokens(session.name))
        session.position += len(token_ids)
        return final

    async def _end_cancelled(self, session: str) -> None:
        """End a session whose step was cancelled. The cleanup runs as a task of its own, and
        the step waits for it even when cancelled again: under anyio (the HTTP API) every
        await of a cancelled task is cancelled too, which would stop the cleanup after the
        session left the table and before any worker dropped its caches."""
        task = asyncio.get_running_loop().create_task(self.sessions.end(session, self.epoch))
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue
        if not task.cancelled() and task.exception() is not None:
            log.warning("session %s: ending it after its step was cancelled failed: %r", session, task.exception())

    async def end_session(self, session: str) -> None:
        """Drop a session's caches everywhere. Gated like a step: a migration's switch never
        sees a session vanish between measuring and pulling its cache rows. Its reservation
        is released at once."""
        self.admission.release(session, self.epoch.placement if self.epoch is not None else None)
        if session not in self.sessions and session not in self.failed:  # it never ran a step
            return
        async with self.gate.step():
            self.failed.pop(session, None)
            await self.sessions.end(session, self.epoch)

    async def close(self) -> None:
        for session in self.sessions:
            await self.end_session(session)
        await self.dataflow.close()
        await self.channels.close()
