"""The bridge from the live cluster to the placement engine: build the interval's
Problem from what workers report, run one of the issue-4 algorithms as a controller
policy, and predict a placement's per-token latency with the cost model.

Links the workers have measured (probes, block pulls) use their figures; any other
link gets the assumed bandwidth and latency (defaults: 100 Mbit/s and 1 ms, a typical
wired edge network).

Re-plans that pay (controller/replan_gate.py): ``LiveTelemetry`` keeps the smoothed view
and the run lengths of what each worker reports, in seconds; an ``AlgorithmPolicy`` given a
``LiveGate`` keeps the previous placement when moving would not pay.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from edgeheads.controller import replan_gate
from edgeheads.controller.algorithms import make_algorithm
from edgeheads.controller.calibration import (Calibration, CalibrationView, calibrated_problem, match_work,
                                              messages_on_path, predict_seconds, work_on_workers)
from edgeheads.controller.costmodel import token_latency_seconds
from edgeheads.controller.problem import Cluster, Device, Infeasible, ModelDemand, Placement, Problem
from edgeheads.controller.resource_aware import whole_model_placements
from edgeheads.controller.spread import InfeasiblePlacement, WorkerCapacity
from edgeheads.common.spec import BlockId, ModelShape

DEFAULT_BANDWIDTH_BYTES_PER_SECOND = 100e6 / 8
DEFAULT_LATENCY_SECONDS = 1e-3
DEFAULT_FLOPS = 1e10  # for a worker that has not measured itself yet
INTERVAL_TOKENS = 16
MAX_HORIZON_TOKENS = 512  # a plan is not counted on for longer than this, however steady the cluster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveWorker:
    name: str
    memory_available_bytes: int
    compute_flops: float
    links: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer name -> (bytes/s, one-way s)


def live_problem(shape: ModelShape, workers: list[LiveWorker], context_tokens: int, interval_tokens: int = 16,
                 bandwidth_bytes_per_second: float = DEFAULT_BANDWIDTH_BYTES_PER_SECOND,
                 latency_seconds: float = DEFAULT_LATENCY_SECONDS, horizon_tokens: int | None = None,
                 decode_context_tokens: int = 0) -> Problem:
    """The interval's problem; its objective weighs latency over ``horizon_tokens`` (default: the
    interval) against the migration. With ``decode_context_tokens`` (the context the running
    generation has reached), compute and the K/V caches to migrate are taken there, and memory
    still at ``context_tokens``: see ``AlgorithmPolicy``."""
    ordered = sorted(workers, key=lambda w: w.name)
    devices = [Device(w.name, float(w.memory_available_bytes), w.compute_flops or DEFAULT_FLOPS,
                      w.compute_flops or DEFAULT_FLOPS) for w in ordered]
    n = len(ordered)
    bandwidth = np.full((n, n), float(bandwidth_bytes_per_second))
    latency = np.full((n, n), float(latency_seconds))
    index = {w.name: i for i, w in enumerate(ordered)}
    for i, w in enumerate(ordered):  # measured links replace the assumption, in both directions
        for peer, (bw, lat) in w.links.items():
            if peer in index:
                j = index[peer]
                if bw > 0:
                    bandwidth[i, j] = bandwidth[j, i] = bw
                if lat > 0:
                    latency[i, j] = latency[j, i] = lat
    cluster = Cluster.from_devices(devices, bandwidth, latency)
    planning = max(1, context_tokens)
    decoding = min(decode_context_tokens, planning) if decode_context_tokens > 0 else planning
    return Problem.build(ModelDemand.from_shape(shape), cluster, decoding, interval_tokens,
                         horizon_tokens=horizon_tokens or interval_tokens,
                         memory_context_tokens=planning + interval_tokens - 1)


def to_indices(problem: Problem, placement: dict[BlockId, str]) -> Placement | None:
    index = {name: i for i, name in enumerate(problem.cluster.names)}
    if set(placement) != set(problem.blocks) or not set(placement.values()) <= set(index):
        return None
    return Placement.of(np.array([index[placement[b]] for b in problem.blocks]))


def to_names(problem: Problem, placement: Placement) -> dict[BlockId, str]:
    return {b: problem.cluster.names[int(d)] for b, d in zip(problem.blocks, placement.array())}


def gained_workers(before: dict[BlockId, str] | None, after: dict[BlockId, str] | None) -> set[str]:
    """The workers that hold a block in ``after`` that they did not hold in ``before`` (none
    when either is unknown)."""
    if not before or not after:
        return set()
    return {name for block, name in after.items() if before.get(block) != name}


def unmeasured_latency(calibration: CalibrationView | None) -> float:
    """The latency assumed on a link no worker has measured: DEFAULT_LATENCY_SECONDS, or none
    once a per-message cost has been fitted from measurements (it is that cost)."""
    return 0.0 if calibration is not None and calibration.windows > 0 else DEFAULT_LATENCY_SECONDS


def predicted_token_seconds(shape: ModelShape, workers: list[LiveWorker], placement: dict[BlockId, str],
                            context_tokens: int, calibration: CalibrationView | Calibration | None = None
                            ) -> float | None:
    """The cost model's per-token latency of ``placement`` (None if it names unknown workers);
    with a calibration, as the head node's client will see it (controller/calibration.py): a
    ``Calibration`` is asked for a view of ``workers`` fitted to the work ``placement`` gives
    them, and the plain model is used while it has measured nothing. None too while no worker
    is known (a controller that took over a placement, before its workers registered again)."""
    if not workers:
        return None
    if isinstance(calibration, Calibration):
        learned = calibration
        calibration = learned.view([w.name for w in workers])
        calibration = calibration if calibration.calibrated else None
    else:
        learned = None
    problem = live_problem(shape, workers, context_tokens, latency_seconds=unmeasured_latency(calibration))
    indices = to_indices(problem, placement)
    if indices is None:
        return None
    if calibration is None:
        return token_latency_seconds(problem, indices)
    if learned is not None:  # the same fit, its rates matched to this placement's work (no second fit)
        calibration = dataclasses.replace(calibration, device_rates=match_work(
            calibration.device_rates, calibration.kind_factors, learned.kind_rates, work_on_workers(problem, indices)))
    return predict_seconds(problem, indices, calibration)


class LiveTelemetry:
    """What workers report, smoothed (EWMA with time constant ``smoothing_seconds``; memory drops
    at once), and how long each worker's conditions have lasted, in seconds."""

    def __init__(self, smoothing_seconds: float = replan_gate.SMOOTHING_SECONDS,
                 prior_seconds: float = replan_gate.PRIOR_SECONDS) -> None:
        self.smoothing_seconds = smoothing_seconds
        # a worker's reported speed ramps to a new level over a few reports: one change, not several
        self.tracker = replan_gate.PersistenceTracker(prior=prior_seconds, settle=max(smoothing_seconds, 3.0))
        self._seen: dict[str, tuple[float, float, float, dict[str, float]]] = {}  # name -> (time, compute, memory, bw)

    def observe(self, name: str, compute_flops: float, memory_bytes: float, links: dict[str, tuple[float, float]],
                now: float) -> None:
        old = self._seen.get(name)
        bandwidth = {peer: bw for peer, (bw, _) in links.items() if bw > 0}
        if old is None:
            self._seen[name] = (now, compute_flops, memory_bytes, bandwidth)
        else:
            w = replan_gate.ewma_weight(now - old[0], self.smoothing_seconds)
            compute = replan_gate.ewma(old[1] or None, compute_flops, w) if compute_flops else old[1]
            memory = float(replan_gate.smooth_memory(old[2], memory_bytes, w))
            self._seen[name] = (now, compute, memory, {p: replan_gate.ewma(old[3].get(p), bw, w)
                                                       for p, bw in bandwidth.items()})
        mean_bw = sum(bandwidth.values()) / len(bandwidth) if bandwidth else math.nan  # NaN: not measured yet
        self.tracker.observe_one(name, np.array([compute_flops or math.nan, memory_bytes, mean_bw]), now)

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)
        self.tracker.forget(name)

    def view(self, name: str, compute_flops: float, memory_bytes: int, links: dict[str, tuple[float, float]]
             ) -> tuple[float, int, dict[str, tuple[float, float]]]:
        """(compute, memory, links) for planning: smoothed where known, never more memory than reported."""
        seen = self._seen.get(name)
        if seen is None:
            return compute_flops, memory_bytes, links
        _, compute, memory, bandwidth = seen
        return (compute or compute_flops, int(min(memory, memory_bytes)),
                {p: (bandwidth.get(p, bw), lat) for p, (bw, lat) in links.items()})

    def persistence_seconds(self, now: float) -> dict[str, float]:
        return self.tracker.all(now)

    def ages_seconds(self, now: float) -> dict[str, float]:
        return self.tracker.ages(now)


@dataclass(frozen=True)
class LiveGate:
    """What the gate needs besides the problem: per-worker persistence (seconds), the decode
    rate (tokens/s; 0 when unknown: then one token per predicted token time), the pre-copy
    slowdown, and the prior for a worker without history."""

    persistence_seconds: dict[str, float]
    tokens_per_second: float = 0.0
    precopy_slowdown: float = replan_gate.PRECOPY_SLOWDOWN
    prior_seconds: float = replan_gate.PRIOR_SECONDS
    ages_seconds: dict[str, float] = field(default_factory=dict)  # how long each worker's conditions have lasted
    # the dataflow time per token measured on the placement in use (0: not measured yet): the
    # gain of a move is at most what the proposal is predicted to save on that (replan_gate.gate)
    measured_seconds: float = 0.0
    # the placement in use runs while tokens decode but no window of it was measured yet: it is
    # kept unless it no longer fits (replan_gate, "Measured first")
    settling: bool = False
    # a gain under this fraction of the placement in use's time is within the model's error
    min_gain_fraction: float = replan_gate.MIN_LIVE_GAIN_FRACTION
    # the most messages per token on the path of any placement measured lately (0: none
    # measured): the fitted message cost is not extrapolated beyond it (``within_measured``)
    measured_messages: float = 0.0


def planning_horizon_tokens(gate: LiveGate | None, names, interval_tokens: int = INTERVAL_TOKENS) -> int:
    """How many tokens a plan is weighed over: the interval, or with the gate, as long as the
    conditions of every worker have lasted so far (the least of their ages, in tokens at the
    decode rate), within [interval, MAX_HORIZON_TOKENS]. A move is proposed only once it would
    have paid back over a stretch as long as the change has already held, the ski-rental rule:
    it never pays more than twice what knowing the future would have.

    Weighed over the interval alone, a plan never proposes a move that pays back only after it:
    on the testbed a board that a hog slowed from 20 to 180 ms a token kept the whole model for
    400 tokens, since moving its 68 MB (5 s at the assumed 100 Mbit/s) did not pay within 16
    tokens. Weighed over the expected persistence instead (prior included), the first burst of
    load that flipped between two boards every 4 tokens moved the whole model, and the plans
    after it chased the bursts (1.57x the static plan's time). A new change has no age: the
    horizon stays at the interval until it has lasted."""
    if gate is None or gate.tokens_per_second <= 0:
        return interval_tokens
    seconds = min((gate.ages_seconds.get(name, 0.0) for name in names), default=0.0)
    return int(min(MAX_HORIZON_TOKENS, max(interval_tokens, seconds * gate.tokens_per_second)))


class AlgorithmPolicy:
    """A controller policy that runs a placement algorithm ("resource-aware", ...).

    Memory is planned for ``context_tokens`` (the controller's planning context: the longest
    generation a placement must hold), and latency and migration at ``decode_context`` when the
    head node has reported one (the context decoding has reached). Priced at the planning
    context of 2048, a SmolLM2 token's attention came out 4.4x the FLOPs it had at 100 tokens of
    context: the plan predicted the placement in use at 2-3x what it measured, and the gate,
    which caps a move's gain at the measured time less the proposal's prediction, refused the
    move off a board that a CPU hog slowed for 300 tokens."""

    uses_previous = True
    uses_compute = True
    uses_gate = True

    def __init__(self, algorithm: str) -> None:
        self.name = algorithm
        self.algorithm = make_algorithm(algorithm)
        self.last_gate: replan_gate.GateDecision | None = None

    def __call__(self, shape: ModelShape, workers: list[WorkerCapacity], context_tokens: int,
                 previous: dict[BlockId, str] | None = None, live: list[LiveWorker] | None = None,
                 gate: LiveGate | None = None, calibration: CalibrationView | None = None,
                 decode_context: int = 0) -> dict[BlockId, str]:
        known = {w.name: w for w in live or []}
        live = [known.get(w.name, LiveWorker(w.name, w.memory_available_bytes, 0.0)) for w in workers]
        calibrated = calibration is not None and calibration.calibrated
        problem = live_problem(shape, live, context_tokens, latency_seconds=unmeasured_latency(calibration),
                               horizon_tokens=planning_horizon_tokens(gate, [w.name for w in live]),
                               decode_context_tokens=decode_context)
        if calibrated:
            problem = calibrated_problem(problem, calibration)
        before = to_indices(problem, previous) if previous else None
        decision = self.algorithm.place(problem, before)
        if isinstance(decision, Infeasible):
            raise InfeasiblePlacement(decision.reason)
        if before is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("%s over %d tokens: staying %.2f ms/token (measured %.2f), its proposal %.2f ms/token (%s)",
                      self.name, problem.horizon_tokens, 1e3 * token_latency_seconds(problem, before),
                      1e3 * (gate.measured_seconds if gate is not None else 0.0),
                      1e3 * token_latency_seconds(problem, decision),
                      "calibrated" if calibrated else "uncalibrated")
            log.debug("planned on: FLOP/s %s, memory %s, bandwidth %s, latency %s; %s",
                      dict(zip(problem.cluster.names, problem.cluster.available_flops_per_second.round())),
                      dict(zip(problem.cluster.names, problem.cluster.memory_bytes)),
                      problem.cluster.bandwidth_bytes_per_second.round().tolist(),
                      problem.cluster.latency_seconds.round(5).tolist(), calibration)
        if gate is not None and before is not None and gate.measured_messages > 0:
            decision = within_measured(problem, before, decision, gate.measured_messages)
        if gate is not None and before is not None:
            chosen, self.last_gate = gate_live(problem, before, decision, gate, getattr(self.algorithm, "repaired", None))
            if chosen is not decision:
                log.info("kept the placement: moving would not pay (%s)", self.last_gate.reason)
                decision = chosen
            elif self.last_gate.transfer_seconds > 0:
                log.info("moving: %s", self.last_gate.reason)
        return to_names(problem, decision)


def within_measured(problem: Problem, previous: Placement, proposed: Placement, measured_messages: float
                    ) -> Placement:
    """``proposed``, unless it sends more messages per token than ``measured_messages`` (the most
    any measured placement sent): then the best placement of the whole model on one device that
    fits (two messages, the head node's), or ``previous`` when none does or it is already best.
    A ``previous`` that no longer fits is never kept this way: the proposal stands.

    The message cost is fitted from what ran. Fitted on one-board placements (two messages a
    token), it says nothing of a placement that sends sixty: on the testbed every move from the
    whole model on one board to one that sent an attention group per layer to another board was
    predicted 20-50% faster and measured 3-9x slower (the calls it splits into each pay a fixed
    cost on a CPU that is slow or shared, which the per-FLOP rates do not carry over)."""
    if replan_gate.infeasible_reason(problem, previous) is not None:
        return proposed
    messages = messages_on_path(problem, proposed)
    if messages <= measured_messages + 1e-6:
        return proposed
    best, best_seconds = previous, token_latency_seconds(problem, previous)
    for assign in whole_model_placements(problem):
        whole = Placement.of(assign)
        seconds = token_latency_seconds(problem, whole)
        if seconds < best_seconds:
            best, best_seconds = whole, seconds
    log.info("the proposal sends %.0f messages a token, more than any measured placement (%.0f): %s instead",
             messages, measured_messages,
             "keeping the placement" if best is previous else "the whole model on one worker")
    return best


def gate_live(problem: Problem, previous: Placement, proposed: Placement, gate: LiveGate, repair=None
              ) -> tuple[Placement, replan_gate.GateDecision]:
    """replan_gate.choose with persistence converted from seconds to tokens at the decode rate;
    ``repair(problem, previous)`` is the algorithm's minimal repair, if it has one."""
    rate = gate.tokens_per_second
    if rate <= 0:
        rate = 1.0 / max(token_latency_seconds(problem, previous), 1e-9)
    persistence = {i: gate.persistence_seconds.get(name, gate.prior_seconds) * rate
                   for i, name in enumerate(problem.cluster.names)}
    slowdown = gate.precopy_slowdown if gate.precopy_slowdown > 0 else math.inf
    broken = repair is not None and replan_gate.infeasible_reason(problem, previous) is not None
    repaired = repair(problem, previous) if broken else None
    return replan_gate.choose(problem, previous, proposed, persistence, slowdown,
                              default_persistence=gate.prior_seconds * rate, repaired=repaired,
                              measured_before=gate.measured_seconds or None, settling=gate.settling,
                              min_gain_fraction=gate.min_gain_fraction)
