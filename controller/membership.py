"""Cluster membership and placement epochs, as plain state (the gRPC service wraps it)."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from edgeheads.controller.algorithms import ALGORITHMS
from edgeheads.controller import replan_gate
from edgeheads.controller.calibration import (HEADNODE_MESSAGES, HOLD_SECONDS_PENDING, Calibration, calibrated_problem,
                                              messages_on_path, work_on_workers)
from edgeheads.controller.config import DEFAULT_POLICY
from edgeheads.controller.decode_rate import DecodeRate
from edgeheads.controller.epochs import PlacementEpoch, PlanDecision, PlanInputs, solve_plan
from edgeheads.controller.costmodel import token_latency_seconds
from edgeheads.controller.live import (AlgorithmPolicy, LiveGate, LiveTelemetry, LiveWorker, live_problem,
                                       gained_workers, predicted_token_seconds, to_indices)
from edgeheads.controller.repair import lost_workers, repair
from edgeheads.controller.shuffle import Shuffle
from edgeheads.controller.spread import POLICIES, InfeasiblePlacement, Placement, WorkerCapacity
from edgeheads.common.spec import ModelShape

log = logging.getLogger(__name__)

MEMORY_RETURN_MARGIN = 64 << 10  # or 1 %: less than this much more memory is not worth a re-plan
RECENT_EPOCHS_KEPT = 8  # placements of the newest epochs kept, to know the one the head node still runs


@dataclass
class WorkerRecord:
    name: str
    address: str
    memory_available_bytes: int
    compute_flops: float
    device: str = "cpu"
    memory_used_bytes: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    over_budget: bool = False  # reported using more than it has; cleared when back under
    cpu_percent: float = 0.0
    load_1m: float = 0.0
    temperature_celsius: float = 0.0
    throttling: int = 0  # controller_pb2.Throttling
    links: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer address -> (bytes/s, latency s)
    memory_limit_bytes: int = 0  # the ceiling it runs under (0: not reported)
    memory_limit_source: str = ""  # "cgroup", "config" or "host"
    kind_rates: dict[str, float] = field(default_factory=dict)  # block kind -> decode FLOP/s as timed
    cpu_available_fraction: float = 0.0  # share of its CPU allowance it can have now (0: not measured)


class ClusterState:
    def __init__(self, policy: str = DEFAULT_POLICY, heartbeat_timeout_seconds: float = 5.0,
                 planning_context_tokens: int = 2048, shuffle_moves: int = 2, shuffle_seed: int = 0,
                 replan_gate: bool = True, smoothing_seconds: float = replan_gate.SMOOTHING_SECONDS,
                 precopy_slowdown: float = replan_gate.PRECOPY_SLOWDOWN) -> None:
        if policy == "shuffle":
            self._policy = Shuffle(shuffle_moves, shuffle_seed)
        elif policy in POLICIES:
            self._policy = POLICIES[policy]
        elif policy in ALGORITHMS:
            self._policy = AlgorithmPolicy(policy)
        else:
            raise ValueError(f"unknown placement policy {policy!r}; known: "
                             f"{sorted({*POLICIES, *ALGORITHMS, 'shuffle'})}")
        self.policy = policy
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.planning_context_tokens = planning_context_tokens
        self.workers: dict[str, WorkerRecord] = {}
        self.shape: ModelShape | None = None
        self.model_name = ""
        self.current = PlacementEpoch(0, {}, {}, policy)
        self.version = 0  # bumped whenever ``current`` is replaced: a new epoch, or a re-plan that failed
        # the epoch the head node's steps last ran under, and the placements of the recent epochs: while a
        # migration is pending the head node still runs an older one, which is what it measures
        self.running_epoch = 0
        self._recent: dict[int, Placement] = {}
        self._short_of: dict[str, int] = {}  # while no placement fits: the memory each worker had then
        self._seeded = False  # the placement is a head node's (adopt): the next plan keeps what still fits
        self._rejoining: tuple[float, frozenset[str]] | None = None  # (until, workers): no plan before they register
        self.decisions: list[PlanDecision] = []
        self.decisions_kept = 50
        # re-plans that pay (controller/replan_gate.py): the planner's smoothed view, run lengths, decode rate
        self.replan_gate = replan_gate
        self.precopy_slowdown = precopy_slowdown
        self.telemetry = LiveTelemetry(smoothing_seconds)
        self.decoding = DecodeRate()
        self.calibration = Calibration(smoothing_seconds)  # the cost model's measured corrections

    def register(self, record: WorkerRecord) -> bool:
        """Add or refresh a worker; True when membership changed."""
        old = self.workers.get(record.name)
        self.workers[record.name] = record
        self.telemetry.observe(record.name, record.compute_flops, record.memory_available_bytes, record.links,
                               record.last_seen)
        self.calibration.observe_worker(record.name, record.kind_rates, record.compute_flops)
        log.info("worker %s registered at %s (%d bytes available)", record.name, record.address,
                 record.memory_available_bytes)
        return old is None or old.address != record.address

    def heartbeat(self, name: str, memory_available_bytes: int, memory_used_bytes: int, compute_flops: float,
                  **readings) -> bool:
        """A telemetry report; ``readings`` are further WorkerRecord fields (cpu_percent, links, ...)."""
        record = self.workers.get(name)
        if record is None:
            return False
        for key, value in readings.items():
            setattr(record, key, value)
        record.last_seen = time.monotonic()
        record.memory_available_bytes = memory_available_bytes
        record.memory_used_bytes = memory_used_bytes
        if compute_flops:
            record.compute_flops = compute_flops
        # a board that has run nothing has only its start-up benchmark: as busy as it is now
        share = record.cpu_available_fraction if not record.kind_rates and record.cpu_available_fraction > 0 else 1.0
        self.telemetry.observe(name, record.compute_flops * share, memory_available_bytes, record.links,
                               record.last_seen)
        self.calibration.observe_worker(name, record.kind_rates, available_fraction=record.cpu_available_fraction)
        return True

    def note_progress(self, tokens: int, now: float | None = None, epoch: int = -1, dataflow_seconds: float = 0.0,
                      head_seconds: float = 0.0, context_tokens: int = 0) -> None:
        """Decoded tokens reported by the head node: the decode rate the gate converts seconds with,
        and (with the step's timings) the windows the cost model's message cost is fitted from."""
        now = time.monotonic() if now is None else now
        if epoch >= 0:
            if epoch != self.running_epoch:  # the head node switched: the workers that gained blocks settle first
                self.calibration.hold(gained_workers(self._recent.get(self.running_epoch),
                                                    self._recent.get(epoch)), now=now)
            self.running_epoch = epoch
        if self.calibration.observe_step(epoch, tokens, dataflow_seconds, head_seconds, context_tokens):
            self._close_calibration_window(epoch)
        self.decoding.note(tokens, now)

    def _close_calibration_window(self, epoch: int) -> None:
        """The model's time (no message cost) and messages for the placement a window ran under."""
        placement = self._recent.get(epoch)
        if self.shape is None or not placement:
            self.calibration.close_window(0.0, 0.0)
            return
        problem = live_problem(self.shape, self.live_workers(smoothed=False), self._context(), latency_seconds=0.0)
        indices = to_indices(problem, placement)
        if indices is None:
            self.calibration.close_window(0.0, 0.0)
            return
        view = self.calibration.view(work=work_on_workers(problem, indices))
        calibrated = calibrated_problem(problem, view, hop_seconds=0.0)
        base = token_latency_seconds(calibrated, indices)
        messages = messages_on_path(calibrated, indices, base)
        self.calibration.close_window(base, messages)
        if self.calibration.windows:
            log.debug("calibration window of epoch %d: measured %.1f ms, model %.1f ms before the message cost, "
                      "%.1f messages; worker rates %s", epoch, 1e3 * self.calibration.windows[-1].measured_seconds,
                      1e3 * base, messages, {k: round(r / 1e9, 2) for k, r in view.device_rates.items()})

    def running(self) -> tuple[int, Placement]:
        """The epoch the head node runs (its latest step's) and its placement; the newest epoch
        when the head node has reported nothing yet, or ran an epoch this controller never published."""
        placement = self._recent.get(self.running_epoch)
        if placement:
            return self.running_epoch, placement
        return self.current.epoch, self.current.placement

    def predict_current(self) -> float | None:
        """The (calibrated, when anything was measured) per-token latency of the placement in use:
        the one the head node runs, which is not yet the newest while a migration is pending."""
        _, placement = self.running()
        if self.shape is None or not placement:
            return None
        return predicted_token_seconds(self.shape, self.live_workers(smoothed=False), placement,
                                       self._context(), self.calibration)

    def _context(self) -> int:
        """The context to predict at: the head node's latest, else the planning context."""
        assert self.shape is not None
        context = self.calibration.context_tokens or self.planning_context_tokens
        return max(1, min(context, self.shape.max_positions))

    def decode_rate(self, now: float | None = None) -> float:
        """Tokens/s lately, 0 when nothing was decoded for DECODE_RATE_STALE_SECONDS."""
        return self.decoding.rate(time.monotonic() if now is None else now)

    def live_workers(self, smoothed: bool = True) -> list[LiveWorker]:
        """What the placement engine needs, with links by peer name; smoothed when the gate is on."""
        by_address = {w.address: w.name for w in self.workers.values()}
        out = []
        for w in self.workers.values():
            compute, memory, links = w.compute_flops, w.memory_available_bytes, w.links
            if smoothed and self.replan_gate:
                compute, memory, links = self.telemetry.view(w.name, compute, memory, links)
            out.append(LiveWorker(w.name, memory, compute,
                                  {by_address[a]: link for a, link in links.items() if a in by_address}))
        return out

    def memory_violation(self, name: str) -> str | None:
        """A reason to re-plan now when worker ``name`` just went over its memory budget
        (once per episode: a plan that cannot fix it is not retried every heartbeat)."""
        record = self.workers.get(name)
        if record is None:
            return None
        over = record.memory_used_bytes > record.memory_available_bytes
        started = over and not record.over_budget
        record.over_budget = over
        if not started:
            return None
        return (f"memory violation on {name}: uses {record.memory_used_bytes} of {record.memory_available_bytes} "
                "bytes")

    def memory_returned(self, name: str) -> str | None:
        """A reason to re-plan now when no placement fits and worker ``name`` reports clearly
        more memory than the failed plan counted on (once per increase)."""
        record, counted = self.workers.get(name), self._short_of.get(name)
        if not self.current.error or record is None or counted is None:
            return None
        if record.memory_available_bytes <= counted + max(MEMORY_RETURN_MARGIN, counted // 100):
            return None
        self._short_of[name] = record.memory_available_bytes
        more = record.memory_available_bytes - counted
        return f"{name} has {record.memory_available_bytes} bytes available, {more} more than when no placement fitted"

    def remove(self, name: str, reason: str) -> bool:
        if self.workers.pop(name, None) is None:
            return False
        self.telemetry.forget(name)
        self.calibration.forget(name)
        log.warning("worker %s left the cluster: %s", name, reason)
        return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        gone = [n for n, w in self.workers.items() if now - w.last_seen > self.heartbeat_timeout_seconds]
        for name in gone:
            self.remove(name, f"no heartbeat for {self.heartbeat_timeout_seconds:.0f} s")
        return gone

    def set_model(self, shape: ModelShape, name: str) -> PlacementEpoch:
        self.announce_model(shape, name)
        return self.replan("model announced")

    def announce_model(self, shape: ModelShape, name: str) -> None:
        """Set the model to place, without planning (the service plans off its event loop)."""
        self.shape, self.model_name = shape, name

    def adopt(self, epoch: int, placement: Placement, addresses: dict[str, str], grace_seconds: float) -> bool:
        """Take over the placement a head node uses, at its epoch, when this controller knows
        an older one (it restarted; the head node announced its model again). Nothing is
        planned until the placement's workers have registered again or ``grace_seconds``
        passed; the next plan is then a repair of it (controller/repair.py), which keeps it
        as it is when every worker is back and it still fits, so that no block moves. False
        (nothing changes) when this controller is not behind or the placement is not one of
        the announced model."""
        if self.shape is None or epoch <= self.current.epoch or set(placement) != set(self.shape.block_ids()):
            return False
        self._publish(PlacementEpoch(epoch, dict(placement), dict(addresses), self.policy,
                                     members=tuple(sorted(set(placement.values())))))
        self._record("placement in use, taken over from the head node", dict(placement),
                     min(self.planning_context_tokens, self.shape.max_positions))
        self._seeded = True
        self._rejoining = (time.monotonic() + grace_seconds, frozenset(placement.values()))
        return True

    def rejoining(self, now: float | None = None) -> set[str]:
        """The workers of an adopted placement that have not registered again, while the
        grace lasts; empty once they all have or it has passed."""
        if self._rejoining is None:
            return set()
        until, names = self._rejoining
        missing = set(names) - set(self.workers)
        if not missing or (time.monotonic() if now is None else now) > until:
            self._rejoining = None
            return set()
        return missing

    def replan(self, reason: str) -> PlacementEpoch:
        """Compute a placement for the current members; a new epoch when it differs."""
        inputs = self.plan_inputs()
        return self.current if inputs is None else self.apply_plan(inputs, solve_plan(inputs), reason)

    def plan_inputs(self) -> PlanInputs | None:
        """A snapshot of what the policy needs (None before a model is announced). With
        :func:`solve_plan` and :meth:`apply_plan` it splits :meth:`replan` so that the solve,
        which may take seconds (``exact``), can run in a worker thread while the event loop
        keeps serving heartbeats; the snapshot never changes under the solver.

        While the placement in use has blocks on workers that left, the plan is a repair
        (controller/repair.py): only those blocks move. So is the first plan after taking over
        a head node's placement (``adopt``), which waits for its workers to register again."""
        if self.shape is None or self.rejoining():
            return None
        extra: dict[str, Any] = {}
        if getattr(self._policy, "uses_previous", False):
            extra["previous"] = dict(self.current.placement)
        if getattr(self._policy, "uses_compute", False):
            extra["live"] = self.live_workers()
            extra["calibration"] = self.calibration.view(list(self.workers), smoothed=bool(self.replan_gate))
            if self.calibration.context_tokens:  # latency where decoding is; memory at the planning context
                extra["decode_context"] = self._context()
        if self.replan_gate and getattr(self._policy, "uses_gate", False):
            now = time.monotonic()
            measured = self.calibration.measured_seconds(self.current.epoch)
            if measured and "calibration" in extra:  # in the model's terms: less the head node's two messages
                measured = max(measured - HEADNODE_MESSAGES * extra["calibration"].hop_seconds, 1e-6)
            rate = self.decode_rate(now)
            extra["gate"] = LiveGate(self.telemetry.persistence_seconds(now), rate,
                                     self.precopy_slowdown, ages_seconds=self.telemetry.ages_seconds(now),
                                     measured_seconds=measured or 0.0,
                                     settling=rate > 0 and self.calibration.settling(self.current.epoch),
                                     measured_messages=max((w.messages for w in self.calibration.windows),
                                                           default=0.0))
        policy = self._policy
        seeded, self._seeded = self._seeded, False
        if seeded or lost_workers(self.current.placement, self.workers):
            policy = functools.partial(repair, self._policy, kept_from=dict(self.current.placement))
        return PlanInputs(policy, self.shape, [WorkerCapacity(w.name, w.memory_available_bytes)
                                                     for w in self.workers.values()],
                          min(self.planning_context_tokens, self.shape.max_positions),
                          {w.name: w.address for w in self.workers.values()}, extra)

    def apply_plan(self, inputs: PlanInputs, outcome: Placement | InfeasiblePlacement, reason: str) -> PlacementEpoch:
        """Publish the outcome of :func:`solve_plan` as a new epoch when it changes anything.
        A placement onto a worker that left or moved during the solve is dropped: the
        membership change that removed it re-plans next."""
        members = tuple(sorted(inputs.addresses))
        if isinstance(outcome, InfeasiblePlacement):
            log.error("no feasible placement (%s): %s", reason, outcome)
            self._short_of = {c.name: c.memory_available_bytes for c in inputs.capacities}
            self._publish(PlacementEpoch(self.current.epoch, self.current.placement, self.current.addresses,
                                         self.policy, error=str(outcome), members=members))
            return self.current
        placement = outcome
        self._short_of = {}
        stale = {n for n in set(placement.values())
                 if n not in self.workers or self.workers[n].address != inputs.addresses.get(n)}
        if stale:
            log.info("dropping a placement (%s) onto workers that changed during the solve: %s", reason,
                     sorted(stale))
            return self.current
        addresses = {n: self.workers[n].address for n in set(placement.values())}
        if placement != self.current.placement or addresses != self.current.addresses or self.current.error:
            previous = self.current.placement
            self._publish(PlacementEpoch(self.current.epoch + 1, placement, addresses, self.policy, members=members))
            self._record(reason, previous, inputs.context_tokens)
        return self.current

    def _publish(self, current: PlacementEpoch) -> None:
        # the workers it moves blocks onto: their timings wait until the move has settled
        self.calibration.hold(gained_workers(self._recent.get(self.running_epoch), current.placement),
                              HOLD_SECONDS_PENDING)
        self.current = current
        self.version += 1
        if current.placement:
            self._recent[current.epoch] = current.placement
            for old in sorted(self._recent)[:-RECENT_EPOCHS_KEPT]:
                del self._recent[old]

    def _record(self, reason: str, previous: Placement, context: int) -> None:
        placement = self.current.placement
        moved = sum(1 for b, w in placement.items() if b in previous and previous[b] != w)
        per_worker: dict[str, int] = {}
        for worker in placement.values():
            per_worker[worker] = per_worker.get(worker, 0) + 1
        live = self.live_workers(smoothed=False)  # the prediction is for the conditions as reported
        view = self.calibration.view(list(self.workers))
        if self.calibration.context_tokens:
            context = self._context()
        predicted = predicted_token_seconds(self.shape, live, placement, context, self.calibration) if self.shape else None
        predicted = None if predicted is None else float(predicted)
        decision = PlanDecision(self.current.epoch, time.time(), reason, self.policy, moved, per_worker, predicted,
                                view.calibrated)
        self.decisions.append(decision)
        del self.decisions[:-self.decisions_kept]
        log.info("placement epoch %d (%s, policy %s): %d blocks moved; per worker %s; predicted %s per token",
                 decision.epoch, reason, self.policy, moved, per_worker,
                 f"{predicted * 1e3:.1f} ms" if predicted is not None else "n/a")
