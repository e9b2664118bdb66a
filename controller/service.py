"""The Controller gRPC servicer: a thin adapter over ClusterState."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from edgeheads.controller.epochs import PlacementEpoch, solve_plan
from edgeheads.controller.membership import ClusterState, WorkerRecord
from edgeheads.v1 import controller_pb2, controller_pb2_grpc
from edgeheads.common.spec import BlockId, ModelShape

log = logging.getLogger(__name__)

# how long a restarted controller waits for the workers of a head node's placement to register
# again before planning: workers retry every 5 s at most (worker/daemon.py), jittered by 20 %
REJOIN_GRACE_SECONDS = 10.0


def placement_reply(p: PlacementEpoch) -> controller_pb2.PlacementReply:
    return controller_pb2.PlacementReply(
        epoch=p.epoch, policy=p.policy, error=p.error, members=list(p.members),
        assignments=[controller_pb2.Assignment(block_id=str(b), worker=w, address=p.addresses[w])
                     for b, w in sorted(p.placement.items())])


class ControllerService(controller_pb2_grpc.ControllerServicer):
    def __init__(self, state: ClusterState, heartbeat_seconds: float = 1.0, replan_every_tokens: int = 0) -> None:
        self.state = state
        self.heartbeat_seconds = heartbeat_seconds
        self.replan_every_tokens = replan_every_tokens
        self.tokens_since_plan = 0
        self.changed = asyncio.Condition()  # notified after every re-plan, new epoch or not
        self.metrics = None  # ControllerMetrics, set by the daemon
        self._pending: list[tuple[str, str]] = []  # (trigger, reason) asked for, not yet planned
        self._asked = 0  # tickets handed out by request_replan
        self._served = 0  # every ticket up to this one has been planned
        self._wake = asyncio.Event()
        self._planner: asyncio.Task | None = None

    def request_replan(self, trigger: str, reason: str) -> int:
        """Ask for a re-plan and return at once with its ticket; ``trigger`` (tokens, timer,
        memory, membership, model) labels the metric.

        One planner task runs the policy in a worker thread, so a long solve (``exact``) never
        holds up a handler: heartbeats, registrations and progress reports go on being read.
        Requests that arrive during a solve are planned together in the next one, and a caller
        that goes away (a cancelled RPC) cannot cancel a plan."""
        self._pending.append((trigger, reason))
        self._asked += 1
        if self._planner is None or self._planner.done():
            self._planner = asyncio.get_running_loop().create_task(self._plan_loop())
        self._wake.set()
        return self._asked

    async def replan_and_wait(self, trigger: str, reason: str) -> None:
        """``request_replan``, then wait until that request has been planned."""
        ticket = self.request_replan(trigger, reason)
        async with self.changed:
            await self.changed.wait_for(lambda: self._served >= ticket)

    async def _plan_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending, upto = self._pending, [], self._asked
            self.tokens_since_plan = 0  # any plan counts as the latest one
            try:
                inputs = self.state.plan_inputs()  # a snapshot: the state may change during the solve
                if inputs is not None:
                    outcome = await asyncio.to_thread(solve_plan, inputs)
                    self.state.apply_plan(inputs, outcome, "; ".join(dict.fromkeys(r for _, r in batch)))
            except Exception:  # a policy bug must not stop all future re-plans
                log.exception("re-plan failed (%s)", "; ".join(r for _, r in batch))
            if self.metrics is not None:
                for trigger, _ in batch:
                    self.metrics.replans.labels(trigger).inc()
                self.metrics.epoch.set(self.state.current.epoch)
                self.metrics.workers.set(len(self.state.workers))
            self._served = upto
            async with self.changed:
                self.changed.notify_all()

    async def replan_timer(self, period_seconds: float) -> None:
        """Re-plan every ``period_seconds`` (runs for the daemon's lifetime when configured)."""
        while True:
            await asyncio.sleep(period_seconds)
            await self.replan_and_wait("timer", f"{period_seconds:g} s since the last timed re-plan")

    async def sweep(self) -> None:
        """Expire workers whose heartbeats stopped (runs for the daemon's lifetime)."""
        while True:
            await asyncio.sleep(self.state.heartbeat_timeout_seconds / 4)
            if self.state.expire():
                self.request_replan("membership", "worker heartbeat timeout")

    async def Register(self, request, context):
        if not request.name or not request.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "register needs a name and an address")
        changed = self.state.register(WorkerRecord(request.name, request.address, request.memory_available_bytes,
                                                   request.compute_flops, request.device or "cpu",
                                                   memory_limit_bytes=request.memory_limit_bytes,
                                                   memory_limit_source=request.memory_limit_source))
        if changed:
            self.request_replan("membership", f"worker {request.name} joined")
        return controller_pb2.RegisterReply(name=request.name, heartbeat_seconds=self.heartbeat_seconds)

    async def Telemetry(self, request_iterator, context):
        name = None
        try:
            async for report in request_iterator:
                name = report.name
                readings = dict(cpu_percent=report.cpu_percent, load_1m=report.load_1m,
                                memory_limit_bytes=report.memory_limit_bytes,
                                memory_limit_source=report.memory_limit_source,
                                temperature_celsius=report.temperature_celsius, throttling=report.throttling,
                                kind_rates={k.kind: k.flops_per_second for k in report.kind_rates},
                                cpu_available_fraction=report.cpu_available_fraction,
                                links={link.peer: (link.bandwidth_bytes_per_second, link.latency_seconds)
                                       for link in report.links})
                if not self.state.heartbeat(report.name, report.memory_available_bytes, report.memory_used_bytes,
                                            report.compute_flops, **readings):
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"worker {report.name!r} is not registered")
                if self.metrics is not None:
                    self.metrics.memory_used.labels(report.name).set(report.memory_used_bytes)
                    self.metrics.memory_available.labels(report.name).set(report.memory_available_bytes)
                    self.metrics.compute_flops.labels(report.name).set(report.compute_flops)
                reason = self.state.memory_violation(report.name) or self.state.memory_returned(report.name)
                if reason:
                    self.request_replan("memory", reason)
        finally:
            # the stream ending means the worker stopped or its link died
            if name is not None and self.state.remove(name, "telemetry stream closed"):
                self.request_replan("membership", f"worker {name} left")
        return controller_pb2.TelemetryAck()

    async def SetModel(self, request, context):
        try:
            shape = ModelShape.from_json(request.model_shape_json)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad model shape: {err}")
        try:
            in_use = {BlockId.parse(a.block_id): a.worker for a in request.assignments}
            if any(not a.worker or not a.address for a in request.assignments):
                raise ValueError("an assignment needs a worker and its address")
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad assignment: {err}")
        self.state.announce_model(shape, request.model_name)
        reason = "model announced"
        if in_use and self.state.adopt(request.epoch, in_use, {a.worker: a.address for a in request.assignments},
                                       REJOIN_GRACE_SECONDS):
            log.warning("took over the head node's placement at epoch %d (%d blocks on %s); waiting up to %g s "
                        "for its workers to register", request.epoch, len(in_use),
                        ", ".join(sorted(set(in_use.values()))), REJOIN_GRACE_SECONDS)
            while self.state.rejoining():
                await asyncio.sleep(0.1)
            missing = set(in_use.values()) - set(self.state.workers)
            reason = "model announced again with its placement" + (
                f"; {', '.join(sorted(missing))} did not register again" if missing else "")
        await self.replan_and_wait("model", reason)
        return placement_reply(self.state.current)

    async def GetPlacement(self, request, context):
        return placement_reply(self.state.current)

    async def WatchPlacement(self, request, context):
        """Every epoch newer than ``after_epoch``, and every failed re-plan (an error with the
        epoch unchanged): a head node that lost a worker learns that the others cannot hold
        the model."""
        sent = -1  # the state's version last sent

        def news() -> bool:
            current = self.state.current
            return self.state.version != sent and (current.epoch > request.after_epoch or bool(current.error))
        while True:
            async with self.changed:
                await self.changed.wait_for(news)
            sent = self.state.version
            yield placement_reply(self.state.current)

    async def ReportProgress(self, request_iterator, context):
        async for report in request_iterator:
            self.tokens_since_plan += report.tokens
            self.state.note_progress(report.tokens, epoch=report.epoch, dataflow_seconds=report.dataflow_seconds,
                                     head_seconds=report.head_seconds, context_tokens=report.context_tokens)
            if self.replan_every_tokens and self.tokens_since_plan >= self.replan_every_tokens:
                self.request_replan("tokens", f"{self.tokens_since_plan} tokens since the last plan")
                self.tokens_since_plan = 0
        return controller_pb2.ProgressAck()

    def _workers(self) -> list[controller_pb2.WorkerInfo]:
        now = time.monotonic()
        return [controller_pb2.WorkerInfo(name=w.name, address=w.address, memory_available_bytes=w.memory_available_bytes,
                                          compute_flops=w.compute_flops, seconds_since_heartbeat=now - w.last_seen,
                                          memory_used_bytes=w.memory_used_bytes, cpu_percent=w.cpu_percent,
                                          load_1m=w.load_1m, temperature_celsius=w.temperature_celsius,
                                          throttling=w.throttling, memory_limit_bytes=w.memory_limit_bytes,
                                          memory_limit_source=w.memory_limit_source,
                                          links=[controller_pb2.LinkReport(peer=p, bandwidth_bytes_per_second=bw,
                                                                           latency_seconds=lat)
                                                 for p, (bw, lat) in sorted(w.links.items())])
                for w in sorted(self.state.workers.values(), key=lambda w: w.name)]

    async def ListWorkers(self, request, context):
        return controller_pb2.ListWorkersReply(workers=self._workers())

    async def Status(self, request, context):
        view = self.state.calibration.view(list(self.state.workers))
        current = self.state.predict_current()
        return controller_pb2.ControllerStatusReply(
            model=self.state.model_name, policy=self.state.policy, epoch=self.state.current.epoch,
            error=self.state.current.error, workers=self._workers(), tokens_since_plan=self.tokens_since_plan,
            replan_every_tokens=self.replan_every_tokens,
            decisions=[controller_pb2.PlanDecision(
                epoch=d.epoch, unix_time=d.unix_time, reason=d.reason, policy=d.policy, blocks_moved=d.blocks_moved,
                blocks_per_worker=d.blocks_per_worker, predicted_token_seconds=d.predicted_token_seconds or 0.0,
                calibrated=d.calibrated)
                for d in self.state.decisions],
            calibration=controller_pb2.CostCalibration(
                hop_seconds=view.hop_seconds, head_seconds=view.head_seconds, kind_factors=view.kind_factors,
                observations=view.windows),
            current_predicted_token_seconds=current or 0.0, running_epoch=self.state.running()[0])
