"""Calibrating the cost model from measurements (controller/calibration.py): the rate fit,
the calibrated problem, the message count on the critical path, the message-cost fit, the
windows the controller builds from the head node's progress, and the worker's per-kind timing."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from edgeheads.common.spec import SMOLLM2_135M, BlockKind
from edgeheads.controller import calibration as cal
from edgeheads.controller import costmodel
from edgeheads.controller.algorithms import make_algorithm
from edgeheads.controller.costmodel import token_latency_seconds
from edgeheads.controller.live import LiveWorker, live_problem, predicted_token_seconds, to_indices
from edgeheads.controller.epochs import PlacementEpoch
from edgeheads.controller.membership import ClusterState, WorkerRecord
from edgeheads.worker.telemetry import KindRates

GiB = 1 << 30


def test_rate_fit_recovers_kind_factors_and_worker_speeds_and_scales_unmeasured_workers():
    truth_g = {"attn": 4.0, "proj": 2.5, "ffn": 1.0}
    truth_rate = {"a": 8e9, "b": 2e9}
    measured = {k: {c: r / g for c, g in truth_g.items()} for k, r in truth_rate.items()}
    del measured["b"]["proj"]  # b never ran a projection: still identified through the others
    rates, factors = cal.fit_rates(measured, {"a": 40e9, "b": 10e9, "c": 20e9})
    assert factors == pytest.approx(truth_g, rel=1e-9)
    assert rates["a"] == pytest.approx(8e9) and rates["b"] == pytest.approx(2e9)
    # c has run nothing: its benchmark times the least measured/benchmark ratio (a and b: 1/5)
    assert rates["c"] == pytest.approx(20e9 / 5)


def test_an_unmeasured_worker_is_scaled_by_the_least_efficiency_not_by_a_loaded_workers_load():
    idle = {"a": {"ffn": 4e9}}
    assert cal.fit_rates(idle, {"a": 8e9, "b": 8e9})[0]["b"] == pytest.approx(4e9)
    loaded = {"a": {"ffn": 1e9}}  # a has a quarter of its CPU now: b is not slowed by that
    rates, _ = cal.fit_rates(loaded, {"a": 8e9, "b": 8e9}, {"a": 1e9 / (8e9 * 0.25)})
    assert rates["a"] == pytest.approx(1e9) and rates["b"] == pytest.approx(4e9)
    # two timed workers, efficiencies 0.5 and 0.25: an untimed one gets the least
    rates, _ = cal.fit_rates({"a": {"ffn": 4e9}, "b": {"ffn": 2e9}}, {"a": 8e9, "b": 8e9, "c": 8e9})
    assert rates["c"] == pytest.approx(2e9)
    # bad readings are ignored, not fatal
    rates, factors = cal.fit_rates({"a": {"ffn": math.inf, "attn": 1e9}}, {})
    assert rates == {"a": pytest.approx(1e9)} and factors == {"attn": pytest.approx(1.0)}


def test_efficiencies_are_taken_over_each_workers_cpu_share_not_at_their_best():
    c = cal.Calibration(smoothing_seconds=0.0)
    c.observe_worker("a", {"ffn": 4e9}, 8e9, now=0.0, available_fraction=1.0)
    c.observe_worker("b", {}, 8e9, now=0.0, available_fraction=1.0)
    assert c.efficiencies == {"a": pytest.approx(0.5)}
    # a gets busy with another program that takes 3/4 of it: b is still priced at a's efficiency
    c.observe_worker("a", {"ffn": 1e9}, now=1.0, available_fraction=0.25)
    for _ in range(3):
        assert c.view().device_rates["b"] == pytest.approx(4e9)
    # a slower reading that its share does not explain lowers the estimate: the best reading
    # ever seen is not what an untimed board is priced at (the old rule, 4 GFLOP/s, overrated
    # the testbed's Pis 2-3x)
    c.observe_worker("a", {"ffn": 2e9}, now=2.0, available_fraction=1.0)
    assert c.efficiencies == {"a": pytest.approx(0.25)}
    assert c.view().device_rates["b"] == pytest.approx(2e9)


def test_with_the_work_to_price_a_worker_is_timed_at_its_own_kinds_rates():
    # a and b run every kind alike; c is starved by another program, and its attention (short
    # calls) suffers 10x where its FFN suffers 2x: one rate per worker cannot say both
    measured = {"a": {"attn": 1e9, "ffn": 4e9}, "b": {"attn": 1e9, "ffn": 4e9}, "c": {"attn": 1e8, "ffn": 2e9}}
    work = {"c": {"attn": 9e6, "ffn": 1e6}, "a": {"ffn": 2e6}}  # c does mostly attention
    truth = 9e6 / 1e8 + 1e6 / 2e9

    def seconds_of_c(rates, factors):
        return sum(f * factors[k] / rates["c"] for k, f in work["c"].items())

    even = cal.fit_rates(measured, {})
    assert abs(seconds_of_c(*even) / truth - 1) > 0.3  # the even fit misses c's time badly
    rates, factors = cal.fit_rates(measured, {}, work=work)
    assert factors == pytest.approx(even[1])
    assert seconds_of_c(rates, factors) == pytest.approx(truth, rel=1e-9)
    assert rates["a"] == pytest.approx(4e9) and rates["b"] == pytest.approx(even[0]["b"])
    # a kind a worker never timed is left out of the match; no measured kind leaves its rate alone
    rates, _ = cal.fit_rates(measured, {}, work={"a": {"attn": 1e6, "proj": 5e6}, "b": {"proj": 1e6}})
    assert rates["a"] == pytest.approx(1e6 * factors["attn"] / (1e6 / 1e9))
    assert rates["b"] == pytest.approx(even[0]["b"])


def test_a_prediction_prices_each_workers_blocks_at_the_rates_it_timed_for_their_kinds():
    state = state_with_timings()
    state.heartbeat("w2", 4 * GiB, 0, 5e10, kind_rates={"attn": 1e8, "proj": 1e9, "ffn": 2e9})
    placement = {b: "w2" for b in state.current.placement}
    live = state.live_workers(smoothed=False)
    context = state.planning_context_tokens
    problem = live_problem(SMOLLM2_135M, live, context, latency_seconds=0.0)
    timed = {"attn": 1e8, "proj": 1e9, "ffn": 2e9}
    compute = sum(float(f) / timed[b.kind.value] for b, f in zip(problem.blocks, problem.flops))
    # nothing fitted yet but the rates: no message cost, no head node time (and one worker: no messages)
    assert state.calibration.view().windows == 0 and state.calibration.head_seconds == 0
    predicted = predicted_token_seconds(SMOLLM2_135M, live, placement, context, state.calibration)
    assert predicted == pytest.approx(compute, rel=1e-9)
    even = predicted_token_seconds(SMOLLM2_135M, live, placement, context, state.calibration.view())
    assert abs(even / predicted - 1) > 0.15


def test_rate_fit_without_measurements_knows_nothing():
    assert cal.fit_rates({}, {"a": 1e10}) == ({}, {})
    assert not cal.CalibrationView().calibrated


def small_problem():
    workers = [LiveWorker(f"w{i}", 4 * GiB, 1e10) for i in range(3)]
    return live_problem(SMOLLM2_135M, workers, 64)


def test_calibrated_problem_scales_each_kind_replaces_known_rates_and_adds_the_message_cost():
    problem = small_problem()
    view = cal.CalibrationView(device_rates={"w0": 2e9}, kind_factors={"attn": 3.0, "ffn": 1.0},
                               hop_seconds=0.002)
    out = cal.calibrated_problem(problem, view)
    attn = np.array([b.kind is BlockKind.ATTENTION for b in problem.blocks])
    proj = np.array([b.kind is BlockKind.PROJECTION for b in problem.blocks])
    assert np.allclose(out.flops[attn], 3 * problem.flops[attn])
    assert np.allclose(out.flops[proj], problem.flops[proj])  # no factor known: as the model says
    assert list(out.cluster.available_flops_per_second) == [2e9, 1e10, 1e10]
    assert np.allclose(out.cluster.latency_seconds, problem.cluster.latency_seconds + 0.002)
    assert cal.calibrated_problem(problem, view, hop_seconds=0.0).cluster.latency_seconds[0, 1] == \
        problem.cluster.latency_seconds[0, 1]


def test_a_migration_does_not_pay_the_message_cost_per_block_but_a_token_still_pays_it_per_message():
    problem = small_problem()
    view = cal.CalibrationView(hop_seconds=0.05)  # a starved board's wake-ups, fitted from the dataflow
    out = cal.calibrated_problem(problem, view)
    on_w0 = to_indices(problem, {b: "w0" for b in problem.blocks})
    on_w1 = to_indices(problem, {b: "w1" for b in problem.blocks})
    plain, calibrated = costmodel.migrations(problem, on_w0, on_w1), costmodel.migrations(out, on_w0, on_w1)
    assert len(calibrated) == problem.n_blocks
    assert sum(m.seconds for m in calibrated) == pytest.approx(sum(m.seconds for m in plain))
    # split across workers, a token still crosses links and pays the cost on each message
    split = to_indices(problem, {b: ("w1" if b.kind is BlockKind.FFN else "w0") for b in problem.blocks})
    assert token_latency_seconds(out, split) > token_latency_seconds(problem, split) + 0.05 * SMOLLM2_135M.n_layers
    # calibrating a calibrated problem again keeps the links' own latency for migrations
    twice = cal.calibrated_problem(out, view)
    assert np.allclose(twice.migration_latency_seconds, problem.link_latency_seconds)


def test_the_planner_moves_the_model_off_a_starved_worker_when_the_move_pays_in_its_own_bytes():
    """On the testbed a hog left the board holding every block at ~0.7 s a token while the planner,
    charging a fitted 50 ms message cost to each of 150 block moves (7.5 s), kept them there for
    135 tokens. A move is one stream: what it costs is its bytes."""
    problem = cal.calibrated_problem(
        live_problem(SMOLLM2_135M, [LiveWorker("w0", 4 * GiB, 3e8), LiveWorker("w1", 4 * GiB, 2e9)], 64,
                     bandwidth_bytes_per_second=1.25e8),
        cal.CalibrationView(hop_seconds=0.05))
    on_w0 = to_indices(problem, {b: "w0" for b in problem.blocks})
    on_w1 = to_indices(problem, {b: "w1" for b in problem.blocks})
    gain = problem.horizon_tokens * (token_latency_seconds(problem, on_w0) - token_latency_seconds(problem, on_w1))
    transfer = sum(m.seconds for m in costmodel.migrations(problem, on_w0, on_w1))
    assert transfer < gain < transfer + 0.05 * problem.n_blocks  # pays in bytes, not with 50 ms a block
    decision = make_algorithm("resource-aware").place(problem, on_w0)
    assert token_latency_seconds(problem, decision) < token_latency_seconds(problem, on_w0) / 5
    assert len(costmodel.migrations(problem, on_w0, decision)) > problem.n_blocks // 2


def test_messages_on_path_counts_the_head_nodes_two_and_grows_with_the_hops_a_placement_makes():
    problem = small_problem()
    one = to_indices(problem, {b: "w0" for b in problem.blocks})
    assert cal.messages_on_path(problem, one) == pytest.approx(2.0)
    # every layer's FFN elsewhere: proj -> ffn and ffn -> next layer's attention and proj
    split = to_indices(problem, {b: ("w1" if b.kind is BlockKind.FFN else "w0") for b in problem.blocks})
    layers = SMOLLM2_135M.n_layers
    assert cal.messages_on_path(problem, split) == pytest.approx(2 + 2 * layers - 1, abs=1e-6)


def test_hop_fit_recovers_a_per_message_cost_and_is_clipped():
    windows = [cal.Window(0.010 + m * 0.0007, 0.010, m) for m in (2, 20, 61)]
    assert cal.fit_hop(windows) == pytest.approx(0.0007)
    assert cal.fit_hop([cal.Window(0.001, 0.010, 4)]) == 0.0  # the model already overshoots
    assert cal.fit_hop([cal.Window(10.0, 0.0, 2)]) == cal.HOP_LIMITS_SECONDS[1]
    assert cal.fit_hop([]) == 0.0


def test_hop_fit_follows_conditions_that_change_within_a_generation():
    # a minute at 0.5 ms per message, then a board starved of CPU: 5 ms per message for 30 s
    calm = [cal.Window(0.010 + 30 * 0.0005, 0.010, 30, at=float(t)) for t in range(0, 60, 5)]
    starved = [cal.Window(0.010 + 30 * 0.005, 0.010, 30, at=float(t)) for t in range(60, 90, 5)]
    assert cal.fit_hop(calm + starved) == pytest.approx(0.002, abs=1e-4)  # every window alike: neither
    hop = cal.fit_hop(calm + starved, cal.HOP_MEMORY_SECONDS)
    assert hop == pytest.approx(0.005, rel=0.06)  # the old windows weigh 5% after 30 s
    # and back, 30 s after the other program stops
    after = [cal.Window(0.010 + 30 * 0.0005, 0.010, 30, at=float(t)) for t in range(95, 125, 5)]
    assert cal.fit_hop(starved + after, cal.HOP_MEMORY_SECONDS) == pytest.approx(0.0005, abs=2e-4)


def test_prediction_is_the_calibrated_model_plus_the_head_nodes_messages_and_work():
    problem = small_problem()
    placement = to_indices(problem, {b: "w0" for b in problem.blocks})
    view = cal.CalibrationView({"w0": 5e9}, {"attn": 2.0, "proj": 1.5, "ffn": 1.0}, 0.001, 0.004, 3)
    model = token_latency_seconds(cal.calibrated_problem(problem, view), placement)
    assert cal.predict_seconds(problem, placement, view) == pytest.approx(model + 0.002 + 0.004)


def test_windows_skip_the_switch_and_prefill_and_restart_with_each_epoch():
    c = cal.Calibration()
    assert not c.observe_step(1, 16, 0.5, 0.0, 16)  # prefill
    complete = [c.observe_step(1, 1, 0.01, 0.002, 17 + i) for i in range(cal.SETTLE_STEPS + cal.WINDOW_TOKENS)]
    assert complete[-1] and not any(complete[:-1])
    c.close_window(0.008, 2.0, now=7.0)
    assert c.windows[-1] == cal.Window(0.01, 0.008, 2.0, at=7.0, epoch=1)
    assert c.context_tokens == 16 + cal.SETTLE_STEPS + cal.WINDOW_TOKENS
    assert c.head_seconds == pytest.approx(0.002)
    # a new epoch: its first steps are its switch, and a half window of the old one is dropped
    for _ in range(3):
        c.observe_step(1, 1, 0.01, 0.0, 40)
    assert not any(c.observe_step(2, 1, 0.02, 0.0, 50) for _ in range(cal.SETTLE_STEPS + cal.WINDOW_TOKENS - 1))
    assert c.observe_step(2, 1, 0.02, 0.0, 50)


def test_worker_kind_rates_follow_the_timed_work_and_wait_for_enough_of_it():
    kinds = KindRates(weight=0.5, min_seconds=0.01)
    work = {"attn": [1e6, 0.001], "ffn": [4e7, 0.02]}
    assert kinds.update(work) == {"ffn": 2e9}  # 1 ms of attention is too little to tell
    work["attn"] = [2e7, 0.02]
    work["ffn"] = [8e7, 0.06]  # the next 40 ms ran at 1 GFLOP/s: half-way there
    assert kinds.update(work) == {"attn": 1e9, "ffn": 1.5e9}


def state_with_timings() -> ClusterState:
    state = ClusterState("resource-aware")
    for i in range(3):
        state.register(WorkerRecord(f"w{i}", f"127.0.0.1:{5000 + i}", 4 * GiB, 5e10))
    state.set_model(SMOLLM2_135M, "smollm2")
    for i in range(3):
        state.heartbeat(f"w{i}", 4 * GiB, 0, 5e10, kind_rates={"attn": 1e9, "proj": 2e9, "ffn": 4e9})
    return state


def test_a_placements_measured_time_is_the_median_of_its_own_latest_windows():
    c = cal.Calibration()
    assert c.measured_seconds(1) is None
    for epoch, seconds in ((1, [0.01, 0.05, 0.02, 0.03, 0.04]), (2, [0.2])):
        for t in seconds:
            for _ in range(cal.SETTLE_STEPS + cal.WINDOW_TOKENS if not c._pending and c._epoch != epoch else
                           cal.WINDOW_TOKENS):
                c.observe_step(epoch, 1, t, 0.0, 20)
            c.close_window(0.01, 3.0)
    assert [w.epoch for w in c.windows] == [1, 1, 1, 1, 1, 2]
    assert c.measured_seconds(1) == pytest.approx(0.03)  # the last three: 0.02, 0.03, 0.04
    assert c.measured_seconds(2) == pytest.approx(0.2) and c.measured_seconds(3) is None


def test_a_placement_settles_until_its_first_window_or_two_windows_of_steps():
    c = cal.Calibration()
    assert not c.settling(1)  # nothing runs it yet (a pending move is not held by this)
    c.observe_step(1, 1, 0.01, 0.0, 20)
    assert c.settling(1) and not c.settling(2)
    for _ in range(cal.SETTLE_STEPS + cal.WINDOW_TOKENS - 1):
        c.observe_step(1, 1, 0.01, 0.0, 20)
    c.close_window(0.01, 3.0)
    assert not c.settling(1)  # measured
    for _ in range(cal.SETTLE_STEPS + 2 * cal.WINDOW_TOKENS - 1):
        c.observe_step(2, 1, 0.01, 0.0, 20)
        c.close_window(0.01, 0.0)  # a placement the model cannot price: no window
    assert c.settling(2)
    c.observe_step(2, 1, 0.01, 0.0, 20)
    assert not c.settling(2)  # two windows' steps and still none: it is not held any longer


def test_windows_of_a_placement_the_controller_no_longer_has_are_dropped():
    c = cal.Calibration()
    for _ in range(cal.SETTLE_STEPS + cal.WINDOW_TOKENS):
        c.observe_step(1, 1, 0.01, 0.0, 20)
    c.close_window(0.0, 0.0)  # the head node still ran epoch 1 while the controller was at 2
    assert not c.windows and c.view().windows == 0
    assert not c.observe_step(1, 1, 0.01, 0.0, 21)  # a fresh window starts


def test_controller_fits_the_message_cost_from_progress_and_predicts_with_it():
    state = state_with_timings()
    uncalibrated = state.decisions[0]
    assert not uncalibrated.calibrated
    base = state.predict_current()
    view = state.calibration.view()
    assert view.kind_factors == pytest.approx({"attn": 4.0, "proj": 2.0, "ffn": 1.0})
    assert view.head_seconds == 0 and view.windows == 0
    # the cluster runs 3 ms slower per token than the calibrated model (the head node's own
    # work comes on top): fitted as a per-message cost
    extra = 0.003
    epoch = state.current.epoch
    for i in range(cal.SETTLE_STEPS + 3 * cal.WINDOW_TOKENS):
        state.note_progress(1, epoch=epoch, dataflow_seconds=base + extra, head_seconds=0.001,
                            context_tokens=state.planning_context_tokens)
    view = state.calibration.view()
    assert view.windows == 3
    messages = state.calibration.windows[-1].messages
    assert messages >= 2
    assert view.hop_seconds == pytest.approx(extra / messages, rel=1e-6)
    assert state.predict_current() == pytest.approx(base + extra + 0.001, rel=1e-6)
    # a plan made now comes with a calibrated prediction
    holder = state.current.placement[next(iter(state.current.placement))]
    state.remove(holder, "test")
    state.replan(f"{holder} left")
    assert state.current.epoch == 2 and holder not in state.current.placement.values()
    decision = state.decisions[-1]
    assert decision.calibrated and math.isfinite(decision.predicted_token_seconds)
    assert decision.predicted_token_seconds > state.calibration.view().head_seconds > 0


def test_a_worker_that_leaves_is_forgotten_by_the_calibration():
    state = state_with_timings()
    state.remove("w1", "test")
    assert "w1" not in state.calibration.view().device_rates


def test_planning_sees_rates_averaged_over_seconds_and_predictions_the_latest():
    c = cal.Calibration(smoothing_seconds=3.0)
    c.observe_worker("w", {"ffn": 4e9}, 1e10, now=0.0)
    c.observe_worker("w", {"ffn": 1e9}, now=1.0)  # a hog for a second
    assert c.view().device_rates["w"] == pytest.approx(1e9)
    smoothed = c.view(smoothed=True).device_rates["w"]
    assert smoothed == pytest.approx(4e9 + (1 - math.exp(-1 / 3)) * (1e9 - 4e9))
    c.observe_worker("w", {"ffn": 1e9}, now=31.0)  # and it lasted
    assert c.view(smoothed=True).device_rates["w"] == pytest.approx(1e9, rel=1e-3)


def test_a_controller_without_workers_predicts_nothing_instead_of_failing():
    state = state_with_timings()
    for name in list(state.workers):
        state.remove(name, "test")
    assert state.current.placement and state.predict_current() is None


def test_while_a_migration_is_pending_predictions_and_windows_are_for_the_epoch_the_head_node_runs():
    state = state_with_timings()
    first, placement = state.current.epoch, dict(state.current.placement)
    running_prediction = state.predict_current()
    # a new epoch moves the feed-forward blocks of one worker onto another (as a re-plan would)
    holder = placement[next(iter(placement))]
    other = next(w for w in state.workers if w != holder)
    moved = {b: other if w == holder and b.kind is BlockKind.FFN else w for b, w in placement.items()}
    state._publish(PlacementEpoch(first + 1, moved, dict(state.current.addresses), state.policy))
    assert state.current.epoch == first + 1 and state.current.placement != placement
    # nothing reported yet: the newest epoch is the one in use
    assert state.running() == (first + 1, state.current.placement)
    # the head node still runs the first epoch (its migration is pending)
    base = 0.02
    for _ in range(cal.SETTLE_STEPS + cal.WINDOW_TOKENS):
        state.note_progress(1, epoch=first, dataflow_seconds=base, head_seconds=0.001,
                            context_tokens=state.planning_context_tokens)
    assert state.running() == (first, placement)
    # its window was kept (the controller knows what it ran), not dropped as another epoch's
    assert state.calibration.view().windows == 1
    pending = predicted_token_seconds(state.shape, state.live_workers(smoothed=False), state.current.placement,
                                      state._context(), state.calibration.view())
    assert state.predict_current() != pytest.approx(pending)
    assert state.predict_current() == pytest.approx(
        predicted_token_seconds(state.shape, state.live_workers(smoothed=False), placement, state._context(),
                                state.calibration.view()))
    assert running_prediction is not None
    # once the head node reports the new epoch, it is the one predicted
    state.note_progress(1, epoch=first + 1, dataflow_seconds=base, context_tokens=state.planning_context_tokens)
    assert state.running() == (first + 1, state.current.placement)
    assert state.predict_current() == pytest.approx(pending)


def test_the_timings_of_a_worker_that_just_received_blocks_wait_until_they_settle():
    c = cal.Calibration(smoothing_seconds=0.0)
    c.observe_worker("w", {"ffn": 4e9}, 1e10, now=0.0)
    c.hold({"w"}, seconds=5.0, now=10.0)
    c.observe_worker("w", {"ffn": 0.5e9}, now=11.0)  # first calls on fresh pages: not the board's speed
    c.observe_worker("x", {"ffn": 2e9}, 1e10, now=11.0)  # another worker is not held
    view = c.view()
    assert view.device_rates["w"] == pytest.approx(4e9) and view.device_rates["x"] == pytest.approx(2e9)
    assert c.view(smoothed=True).device_rates["w"] == pytest.approx(4e9)
    c.observe_worker("w", {"ffn": 3e9}, now=15.0)  # settled: counted again
    assert c.view().device_rates["w"] == pytest.approx(3e9)


def test_a_placement_that_moves_blocks_holds_the_workers_that_gain_them_until_the_move_settles():
    state = state_with_timings()
    first, placement = state.current.epoch, dict(state.current.placement)
    state.note_progress(1, epoch=first, dataflow_seconds=0.02)
    before = state.calibration.view().device_rates
    holder = placement[next(iter(placement))]
    other = next(w for w in state.workers if w != holder)
    moved = {b: other if w == holder and b.kind is BlockKind.FFN else w for b, w in placement.items()}
    slow = {"attn": 1e8, "proj": 2e8, "ffn": 4e8}
    state._publish(PlacementEpoch(first + 1, moved, dict(state.current.addresses), state.policy))
    # `other` imports its blocks and may run them before the head node's report of the switch comes
    state.heartbeat(other, 4 * GiB, 0, 5e10, kind_rates=slow)
    assert state.calibration.view().device_rates[other] == pytest.approx(before[other])
    state.note_progress(1, epoch=first + 1, dataflow_seconds=0.02)  # the switch
    for name in state.workers:
        state.heartbeat(name, 4 * GiB, 0, 5e10, kind_rates=slow)
    after = state.calibration.view().device_rates
    assert after[other] == pytest.approx(before[other])  # held: its slow first calls are not its speed
    assert all(after[w] == pytest.approx(before[w] / 10) for w in state.workers if w != other)
    # the hold ends HOLD_SECONDS_AFTER_MOVE after the switch
    state.calibration.observe_worker(other, slow, now=time.monotonic() + cal.HOLD_SECONDS_AFTER_MOVE + 0.1)
    assert state.calibration.view().device_rates[other] == pytest.approx(before[other] / 10)


def test_predictions_follow_the_recent_message_cost_and_planning_the_long_one():
    c = cal.Calibration()
    c.windows.extend([cal.Window(0.010 + 30 * 0.0005, 0.010, 30, at=float(t)) for t in range(0, 60, 5)]
                     + [cal.Window(0.010 + 30 * 0.005, 0.010, 30, at=float(t)) for t in range(60, 90, 5)])
    assert c.view().hop_seconds == pytest.approx(0.005, rel=0.06)
    assert c.view(smoothed=True).hop_seconds == pytest.approx(0.002, abs=1e-4)


def test_a_plan_prices_the_context_decoding_has_reached_and_fits_memory_for_the_planning_context():
    state = state_with_timings()
    planning = state.planning_context_tokens
    assert "decode_context" not in state.plan_inputs().extra  # nothing decoded yet: all at the planning context
    for _ in range(3):
        state.note_progress(1, epoch=state.current.epoch, dataflow_seconds=0.02, context_tokens=100)
    inputs = state.plan_inputs()
    assert inputs.context_tokens == planning and inputs.extra["decode_context"] == 100

    seen = []

    class Recording:  # the algorithm's view of the interval, kept as it is
        def place(self, problem, before):
            seen.append(problem)
            return before

    policy = state._policy
    original, policy.algorithm = policy.algorithm, Recording()
    try:
        state.replan("test")
    finally:
        policy.algorithm = original
    live = state.live_workers()
    at_decode = live_problem(SMOLLM2_135M, live, 100)
    at_planning = live_problem(SMOLLM2_135M, live, planning)
    problem = seen[-1]
    factors = np.array([state.calibration.view().kind_factors[b.kind.value] for b in problem.blocks])
    assert problem.flops == pytest.approx(at_decode.flops * factors)  # calibrated: scaled by kind
    assert not np.allclose(at_decode.flops, at_planning.flops)
    assert problem.memory_bytes == pytest.approx(at_planning.memory_bytes)
    assert problem.migration_bytes == pytest.approx(at_decode.migration_bytes)
    assert problem.migration_bytes.sum() < at_planning.migration_bytes.sum()
    # a context past the planning one is not priced beyond what memory is planned for
    capped = live_problem(SMOLLM2_135M, live, planning, decode_context_tokens=10 * planning)
    assert capped.flops == pytest.approx(at_planning.flops)


def test_the_gate_knows_the_most_messages_any_measured_placement_sent():
    state = state_with_timings()
    assert state.plan_inputs().extra["gate"].measured_messages == 0  # nothing measured yet
    base = state.predict_current()
    for _ in range(cal.SETTLE_STEPS + cal.WINDOW_TOKENS):
        state.note_progress(1, epoch=state.current.epoch, dataflow_seconds=base, context_tokens=50)
    messages = [w.messages for w in state.calibration.windows]
    assert len(messages) == 1 and messages[0] >= 2
    assert state.plan_inputs().extra["gate"].measured_messages == pytest.approx(messages[0])
