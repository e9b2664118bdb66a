"""Live plans do not extrapolate the fitted message cost past what was measured
(controller/live.py, ``within_measured``)."""

import numpy as np
import pytest

from edgeheads.common.spec import SMOLLM2_135M
from edgeheads.controller import replan_gate
from edgeheads.controller.calibration import messages_on_path
from edgeheads.controller.live import LiveWorker, live_problem, within_measured
from edgeheads.controller.problem import Placement


def test_live_a_proposal_sending_more_messages_than_any_measured_placement_becomes_a_whole_model_move():
    workers = [LiveWorker("fast", 4 << 30, 4e10), LiveWorker("slow", 4 << 30, 1e9), LiveWorker("tiny", 1 << 20, 1e11)]
    problem = live_problem(SMOLLM2_135M, workers, 128, latency_seconds=1e-3)
    names = problem.cluster.names
    on_slow = Placement.of(np.full(problem.n_blocks, names.index("slow")))
    # one attention group per layer on the fast board, the rest where it was: a split
    split = on_slow.array().copy()
    first_groups = [i for i, b in enumerate(problem.blocks) if b.kind.value == "attn" and b.kv_group == 0]
    split[first_groups] = names.index("fast")
    split = Placement.of(split)
    assert messages_on_path(problem, on_slow) == pytest.approx(2.0)
    assert messages_on_path(problem, split) > 30
    # measured: only one-board placements (two messages, the head node's): the whole model on the
    # fastest board that holds it (not "tiny", which has no room)
    chosen = within_measured(problem, on_slow, split, measured_messages=2.0)
    assert np.all(chosen.array() == names.index("fast"))
    # a placement with as many messages measured before: the proposal stands
    assert within_measured(problem, on_slow, split, messages_on_path(problem, split)) is split
    # already on the best single board: it stays
    on_fast = Placement.of(np.full(problem.n_blocks, names.index("fast")))
    assert within_measured(problem, on_fast, split, measured_messages=2.0) is on_fast
    # the placement in use no longer fits (its board lost memory) and no single board holds the
    # model: the split stands, it is not traded for the placement that does not fit
    cramped = [LiveWorker("fast", 1 << 20, 4e10), LiveWorker("slow", 1 << 20, 1e9),
               LiveWorker("tiny", 1 << 20, 1e11)]
    tight = live_problem(SMOLLM2_135M, cramped, 128, latency_seconds=1e-3)
    assert replan_gate.infeasible_reason(tight, on_slow) is not None
    assert within_measured(tight, on_slow, split, measured_messages=2.0) is split
