"""Calibrating the cost model from what runs (pure; the controller feeds it, see controller/membership.py).

The paper's cost model (controller/costmodel.py) prices a block at its FLOPs over the device's
FLOP/s and a message at its bytes over the link's bandwidth plus the link's latency. Measured
against a real cluster it misses three things, and this module learns each from measurements:

- **What a block really costs on a worker.** Workers time every decode call per block kind
  (``KindRate`` in their telemetry). Seconds per FLOP of worker k running kind c is fitted as
  ``g_c * u_k`` (``fit_rates``): ``g_c`` says how much dearer a FLOP of attention or projection
  is than one of an FFN (small matrices, the K/V cache, per-call overhead), the same on every
  worker; ``u_k`` is the worker's own speed, under its load and quota as it is now. A worker
  that has not run anything yet gets its start-up benchmark scaled by how far the benchmark
  was from the truth on the workers that have, each over its own CPU share (a loaded worker's
  slowness is its own, not the idle one's), the least of them (an untimed board is not
  assumed faster than the evidence allows), and by the CPU share it has itself. A prediction
  of one placement then sets each timed worker's ``u_k`` so that the work the placement gives
  it costs its measured time (``match_work``): a CPU hog slows a board's short attention calls far more than its FFN.
- **What a message costs beyond its bytes.** Serialising, the relay's framing and the wake-ups
  on both ends: ``hop_seconds`` per message, fitted by least squares from windows of measured
  dataflow time against the calibrated model's prediction without it (``fit_hop``). The two
  messages between the head node and the first and last workers count too. The wake-ups are
  where a worker starved of CPU shows: its blocks time as fast as ever once it runs, but each
  message waits until it does (on the testbed a CPU hog on one board made a round-robin token
  230 ms slower while that board's block timings barely moved). So a prediction's fit weighs
  each window by its age, ``exp(-age / HOP_MEMORY_SECONDS)``: it follows conditions that change
  within a generation. Planning keeps the even fit over every kept window, as it keeps the
  smoothed rates: one cost for every message cannot say which board the wait is at, and a
  starved board's wait charged to every link kept a plan from moving the model off that board
  for 300 tokens. It is a cost per message: a migration, one stream per source, pays the link's
  own latency per block, not this (``Cluster.migration_latency_seconds``).
- **The head node's own work per token:** the LM head, sampling and streaming, as the head node
  measures it (``ProgressReport.head_seconds``).

A worker that has just received blocks times them slowly for a few seconds (their pages are
touched for the first time, the caches grow from nothing): on the testbed a board that took
120 blocks read 0.7 GFLOP/s for a while instead of 2-3, and a plan made on that moved half of
them away again, only to bring them back one plan later. Its timings are not taken from the moment the controller publishes a placement that moves
blocks onto it (its report may come before the head node's first step under it does) until
``HOLD_SECONDS_AFTER_MOVE`` after the head node starts running that placement (``hold``), or
``HOLD_SECONDS_PENDING`` if it never does; what was known before stands meanwhile.

A calibrated prediction of a placement is the cost model on the calibrated problem plus the
head node's two messages and its own time (``predict_seconds``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgeheads.common.spec import BlockKind
from edgeheads.controller.costmodel import token_latency_seconds
from edgeheads.controller.problem import Placement, Problem
from edgeheads.controller.replan_gate import ewma, ewma_weight

REFERENCE_KIND = BlockKind.FFN.value
HOP_LIMITS_SECONDS = (0.0, 0.05)  # a fitted message cost outside this is clipped
WINDOW_TOKENS = 8  # decode steps per fitting window
SETTLE_STEPS = 2  # steps after an epoch change left out of its windows (the switch itself)
WINDOWS_KEPT = 24  # the hop fit uses at most this many recent windows ...
MEASURED_WINDOWS = 3  # the measured time of a placement: the median of its last this many windows
HOP_MEMORY_SECONDS = 4.0  # ... each weighed exp(-age / this)
HEAD_WEIGHT = 0.2  # EWMA weight of each head node report
HEADNODE_MESSAGES = 2  # head node -> layer 0 and the last FFN -> head node
FIT_ROUNDS = 20
HOLD_SECONDS_AFTER_MOVE = 5.0  # a worker's timings ignored this long after blocks moved onto it
HOLD_SECONDS_PENDING = 60.0  # ... and while the move is pending, at most this long


@dataclass(frozen=True)
class CalibrationView:
    """A snapshot of what has been learned, for one plan or one prediction (immutable: a
    solve in a worker thread may hold it while new measurements arrive)."""

    device_rates: dict[str, float] = field(default_factory=dict)  # worker -> FLOP/s of an FFN FLOP
    kind_factors: dict[str, float] = field(default_factory=dict)  # kind -> seconds per FLOP relative to the FFN
    hop_seconds: float = 0.0
    head_seconds: float = 0.0
    windows: int = 0  # measured windows behind hop_seconds

    @property
    def calibrated(self) -> bool:
        """Whether any measured figure is in it (otherwise the plain cost model is used)."""
        return bool(self.device_rates) or self.windows > 0 or self.head_seconds > 0


def fit_rates(kind_rates: dict[str, dict[str, float]], benchmarks: dict[str, float],
              efficiencies: dict[str, float] | None = None,
              work: dict[str, dict[str, float]] | None = None,
              available: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(device rates, kind factors) from measured decode FLOP/s per worker and kind.

    Least squares in log space of ``seconds_per_flop[k, c] = g_c * u_k`` with ``g_ffn = 1``
    (alternating means; the model is exact when every worker runs the same kernels at its own
    speed). Workers without measurements and with a benchmark get that benchmark times the
    least efficiency of the timed workers, times the share of its CPU it can have now
    (``available``, default 1: the others on a busy board slow what it would run). A timed
    worker's efficiency is its rate over its benchmark and over its own CPU share
    (``efficiencies``, kept by ``Calibration``; else its rate over its benchmark): a board that
    other programs slow is not held against an idle one.

    With ``work`` (FLOPs per token of each kind on each worker, for the placement to price:
    ``work_on_workers``), a measured worker's rate is then set so that the time of its work at
    its measured rates comes out exact (``match_work``): a board that a CPU hog starves does
    not slow every kind alike, and one rate per board fitted evenly over the kinds missed the
    time of a board doing mostly attention by 2x either way."""
    observed = {(k, c): math.log(1.0 / r) for k, rates in kind_rates.items() for c, r in rates.items()
                if 0 < r < math.inf}
    workers = sorted({k for k, _ in observed})
    kinds = sorted({c for _, c in observed})
    log_u = {k: statistics.fmean(v for (w, _), v in observed.items() if w == k) for k in workers}
    log_g = {c: 0.0 for c in kinds}
    for _ in range(FIT_ROUNDS):
        log_g = {c: statistics.fmean(v - log_u[k] for (k, cc), v in observed.items() if cc == c) for c in kinds}
        if REFERENCE_KIND in log_g:
            shift = log_g[REFERENCE_KIND]
            log_g = {c: g - shift for c, g in log_g.items()}
        log_u = {k: statistics.fmean(v - log_g[c] for (kk, c), v in observed.items() if kk == k) for k in workers}
    rates = {k: math.exp(-u) for k, u in log_u.items()}
    ratios = [(efficiencies or {}).get(k, rates[k] / benchmarks[k]) for k in workers if benchmarks.get(k, 0) > 0]
    ratios += [r for k, r in (efficiencies or {}).items() if k in benchmarks and k not in workers]
    if ratios:
        # the least efficiency: a board nobody has timed is not assumed faster than the slowest
        # evidence says
        efficiency = min(ratios)
        for k, bench in benchmarks.items():
            if k not in rates and bench > 0:
                rates[k] = bench * efficiency * (available or {}).get(k, 1.0)
    factors = {c: math.exp(g) for c, g in log_g.items()}
    if work:
        rates = match_work(rates, factors, kind_rates, work)
    return rates, factors


def match_work(rates: dict[str, float], factors: dict[str, float], kind_rates: dict[str, dict[str, float]],
               work: dict[str, dict[str, float]]) -> dict[str, float]:
    """``rates`` with each worker that has measured kinds in ``work`` at the rate that prices that
    work (of the measured kinds) at its measured time: sum F_c / r_c = sum F_c g_c / rate."""
    out = dict(rates)
    for k, flops in work.items():
        measured = kind_rates.get(k, {})
        kinds = [c for c, f in flops.items() if f > 0 and 0 < measured.get(c, 0) < math.inf and c in factors]
        seconds = sum(flops[c] / measured[c] for c in kinds)
        scaled = sum(flops[c] * factors[c] for c in kinds)
        if seconds > 0 and scaled > 0:
            out[k] = scaled / seconds
    return out


def work_on_workers(problem: Problem, placement: Placement) -> dict[str, dict[str, float]]:
    """FLOPs per decoded token of each block kind on each device of ``problem`` under ``placement``."""
    out: dict[str, dict[str, float]] = {}
    for block, device, flops in zip(problem.blocks, placement.array(), problem.flops):
        kinds = out.setdefault(problem.cluster.names[int(device)], {})
        kinds[block.kind.value] = kinds.get(block.kind.value, 0.0) + float(flops)
    return out


def calibrated_problem(problem: Problem, view: CalibrationView, hop_seconds: float | None = None) -> Problem:
    """``problem`` with the measured block costs and the message cost added to every link's
    latency (``hop_seconds`` overrides the view's). Devices the view does not know keep their FLOP/s."""
    hop = view.hop_seconds if hop_seconds is None else hop_seconds
    cluster = problem.cluster
    rates = np.array([view.device_rates.get(name, 0.0) for name in cluster.names])
    available = np.where(rates > 0, rates, cluster.available_flops_per_second)
    factors = np.array([view.kind_factors.get(b.kind.value, 1.0) for b in problem.blocks])
    # the message cost is per message: a migration, one stream per source, pays the link's own latency
    migration_latency = cluster.latency_seconds if cluster.migration_latency_seconds is None \
        else cluster.migration_latency_seconds
    cluster = dataclasses.replace(cluster, available_flops_per_second=available,
                                  latency_seconds=cluster.latency_seconds + hop,
                                  migration_latency_seconds=migration_latency)
    return dataclasses.replace(problem, cluster=cluster, flops=problem.flops * factors)


def messages_on_path(problem: Problem, placement: Placement, base_seconds: float | None = None) -> float:
    """How many messages the critical path of ``placement`` carries (the cost model's slope in
    a per-message cost), the head node's two included."""
    base = token_latency_seconds(problem, placement) if base_seconds is None else base_seconds
    step = 1e-3
    bumped = dataclasses.replace(problem, cluster=dataclasses.replace(
        problem.cluster, latency_seconds=problem.cluster.latency_seconds + step))
    return (token_latency_seconds(bumped, placement) - base) / step + HEADNODE_MESSAGES


def predict_seconds(problem: Problem, placement: Placement, view: CalibrationView) -> float:
    """Per-token latency of ``placement`` as the head node's client sees it: the calibrated
    cost model, the head node's two messages and its own work."""
    return (token_latency_seconds(calibrated_problem(problem, view), placement)
            + HEADNODE_MESSAGES * view.hop_seconds + view.head_seconds)


@dataclass(frozen=True)
class Window:
    """One fitting window: the measured median dataflow time of a few steps of one placement,
    the calibrated model's time for it without any message cost, and its messages on the path."""

    measured_seconds: float
    model_seconds: float
    messages: float
    at: float = 0.0  # monotonic time it closed
    epoch: int = -1  # the placement epoch it ran under


def fit_hop(windows: list[Window], memory_seconds: float = math.inf) -> float:
    """The per-message cost minimising the squared error of ``model + messages * hop`` over the
    windows, each weighed ``exp(-age / memory_seconds)`` (age from the newest window)."""
    newest = max((w.at for w in windows), default=0.0)
    weights = [math.exp(-(newest - w.at) / memory_seconds) if memory_seconds > 0 else float(w.at == newest)
               for w in windows]
    num = sum(k * (w.measured_seconds - w.model_seconds) * w.messages for k, w in zip(weights, windows))
    den = sum(k * w.messages ** 2 for k, w in zip(weights, windows))
    if den <= 0:
        return 0.0
    low, high = HOP_LIMITS_SECONDS
    return min(high, max(low, num / den))


class Calibration:
    """What the controller has measured so far (one per controller)."""

    def __init__(self, smoothing_seconds: float = 3.0) -> None:
        self.smoothing_seconds = smoothing_seconds
        self.kind_rates: dict[str, dict[str, float]] = {}
        # for planning: the same rates averaged over ``smoothing_seconds`` (time-weighted), so a
        # plan does not follow load that comes and goes within a few seconds
        self.smoothed_rates: dict[str, dict[str, float]] = {}
        self._seen_at: dict[str, float] = {}
        self._share_seen_at: dict[str, float] = {}
        self.benchmarks: dict[str, float] = {}
        # per timed worker: its smoothed rate over its benchmark and its CPU share (fit_rates)
        self.efficiencies: dict[str, float] = {}
        self.available: dict[str, float] = {}  # per worker: its CPU share now, over smoothing_seconds
        self.head_seconds = 0.0
        self.windows: deque[Window] = deque(maxlen=WINDOWS_KEPT)
        self.context_tokens = 0
        self._epoch = -1
        self._steps_in_epoch = 0
        self._pending: list[float] = []
        self._held_until: dict[str, float] = {}  # worker -> monotonic time its timings count again

    def hold(self, names, seconds: float = HOLD_SECONDS_AFTER_MOVE, now: float | None = None) -> None:
        """Ignore the timings of workers ``names`` for the next ``seconds`` (instead of any hold
        before): blocks are moving onto them, or just did."""
        until = (time.monotonic() if now is None else now) + seconds
        for name in names:
            self._held_until[name] = until

    def observe_worker(self, name: str, kind_rates: dict[str, float], benchmark_flops: float = 0.0,
                       now: float | None = None, available_fraction: float = 0.0) -> None:
        if benchmark_flops > 0:
            self.benchmarks.setdefault(name, benchmark_flops)
        now = time.monotonic() if now is None else now
        if 0 < available_fraction <= 1:
            weight = ewma_weight(now - self._share_seen_at.get(name, -math.inf), self.smoothing_seconds)
            self.available[name] = ewma(self.available.get(name), available_fraction, weight)
            self._share_seen_at[name] = now
        kind_rates = {k: r for k, r in kind_rates.items() if 0 < r < math.inf}
        if kind_rates and now >= self._held_until.get(name, -math.inf):
            self.kind_rates[name] = dict(kind_rates)
            weight = ewma_weight(now - self._seen_at.get(name, -math.inf), self.smoothing_seconds)
            old = self.smoothed_rates.get(name, {})
            self.smoothed_rates[name] = {k: ewma(old.get(k), r, weight) for k, r in kind_rates.items()}
            self._seen_at[name] = now
            if self.benchmarks.get(name, 0) > 0:  # how far the benchmark is from the truth (fit_rates)
                fitted, _ = fit_rates(self.smoothed_rates, self.benchmarks)
                if name in fitted:
                    share = self.available.get(name, 1.0)
                    self.efficiencies[name] = fitted[name] / (self.benchmarks[name] * share)

    def forget(self, name: str) -> None:
        self.kind_rates.pop(name, None)
        self.smoothed_rates.pop(name, None)
        self._seen_at.pop(name, None)
        self.benchmarks.pop(name, None)
        self.efficiencies.pop(name, None)
        self.available.pop(name, None)
        self._share_seen_at.pop(name, None)
        self._held_until.pop(name, None)

    def observe_step(self, epoch: int, tokens: int, dataflow_seconds: float, head_seconds: float,
                     context_tokens: int) -> bool:
        """One step the head node reported; True when a window of this epoch is complete (then
        call ``close_window`` with the model's figures for the placement in use)."""
        if context_tokens:
            self.context_tokens = context_tokens
        if head_seconds > 0:
            self.head_seconds = head_seconds if not self.head_seconds else (
                self.head_seconds + HEAD_WEIGHT * (head_seconds - self.head_seconds))
        if epoch != self._epoch:
            self._epoch, self._steps_in_epoch, self._pending = epoch, 0, []
        if tokens != 1 or dataflow_seconds <= 0:  # a prefill (or batched) step runs at another rate
            return False
        self._steps_in_epoch += 1
        if self._steps_in_epoch <= SETTLE_STEPS:
            return False
        self._pending.append(dataflow_seconds)
        return len(self._pending) >= WINDOW_TOKENS

    def close_window(self, model_seconds: float, messages: float, now: float | None = None) -> None:
        """Record the window just completed against the model's time (no message cost) and
        messages; one the model cannot price (``messages`` 0: the placement it ran under is not
        the controller's current one) is dropped."""
        if self._pending and messages > 0:
            self.windows.append(Window(statistics.median(self._pending), model_seconds, messages,
                                       time.monotonic() if now is None else now, self._epoch))
        self._pending = []

    def measured_seconds(self, epoch: int, windows: int = MEASURED_WINDOWS) -> float | None:
        """The dataflow time per token measured under ``epoch`` lately: the median of its last
        ``windows`` windows (each a median of WINDOW_TOKENS steps); None before one closed."""
        own = [w.measured_seconds for w in self.windows if w.epoch == epoch][-windows:]
        return statistics.median(own) if own else None

    def settling(self, epoch: int) -> bool:
        """Whether ``epoch`` runs (the head node's latest steps were under it) but no window of
        it has closed yet, and one should soon: fewer than two windows' steps have run."""
        return (epoch == self._epoch and self.measured_seconds(epoch) is None
                and self._steps_in_epoch < SETTLE_STEPS + 2 * WINDOW_TOKENS)

    def view(self, workers: list[str] | None = None, smoothed: bool = False,
             work: dict[str, dict[str, float]] | None = None) -> CalibrationView:
        """What has been learned: from the latest rates and the recent windows (predictions), or
        from the smoothed rates and every kept window alike (planning); with ``work``, the
        workers' rates fitted to price that work (``fit_rates``)."""
        names = set(self.kind_rates) | set(self.benchmarks) if workers is None else set(workers)
        measured = self.smoothed_rates if smoothed else self.kind_rates
        rates, factors = fit_rates({k: r for k, r in measured.items() if k in names},
                                   {k: b for k, b in self.benchmarks.items() if k in names},
                                   {k: r for k, r in self.efficiencies.items() if k in names}, work,
                                   {k: a for k, a in self.available.items() if k in names})
        hop = fit_hop(list(self.windows), math.inf if smoothed else HOP_MEMORY_SECONDS)
        return CalibrationView(rates, factors, hop, self.head_seconds, len(self.windows))


__all__ = ["Calibration", "CalibrationView", "Window", "calibrated_problem", "fit_hop", "fit_rates",
           "match_work", "messages_on_path", "predict_seconds", "work_on_workers"]
