"""The cost model checked by hand on a 2-device, 2-layer example (numbers in the comments)."""

import numpy as np
import pytest

from edgeheads.controller import costmodel
from edgeheads.controller.problem import Cluster, Device, Placement, uniform_problem

# d0: 1 GFLOP/s, d1: 2 GFLOP/s. Link d0->d1: 1 MB/s, d1->d0: 0.5 MB/s, 1 ms latency each way.
# Per layer: attention blocks 1 MFLOP, proj 2 MFLOP, ffn 4 MFLOP; head outputs 1000 B,
# residual stream 2000 B. Memory: attention 10 B, proj 20 B, ffn 40 B.
BW = np.array([[np.inf, 1e6], [5e5, np.inf]])


def problem(headnode=None, d1_memory=1000.0, interval_tokens=1):
    cluster = Cluster.from_devices(
        [Device("d0", 1000.0, 1e9, 1e9), Device("d1", d1_memory, 2e9, 2e9)], BW, 0.001
    )
    return uniform_problem(
        cluster, n_layers=2, kv_groups=2,
        attention_memory_bytes=10, projection_memory_bytes=20, ffn_memory_bytes=40,
        attention_flops=1e6, projection_flops=2e6, ffn_flops=4e6,
        attention_output_bytes=1000, residual_bytes=2000,
        interval_tokens=interval_tokens, headnode=headnode,
    )


# blocks: attn(0,0) attn(0,1) proj(0) ffn(0) attn(1,0) attn(1,1) proj(1) ffn(1)
PLACEMENT = Placement((0, 1, 0, 1, 1, 1, 1, 0))


def test_two_layer_latency_by_hand():
    lat = costmodel.token_latency(problem(), PLACEMENT)
    # Layer 0 (no head node, so x_0 costs nothing):
    #   d0: 1e6/1e9 = 1 ms compute, proj is local                      -> 1.0 ms
    #   d1: 1e6/2e9 = 0.5 ms + send 1 ms + 1000 B / 0.5 MB/s = 2 ms     -> 3.5 ms
    #   proj on d0 2 ms; proj->ffn d0->d1: 1 ms + 2000/1e6 = 3 ms; ffn on d1: 4e6/2e9 = 2 ms
    l0 = lat.layers[0]
    assert l0.attention_phase_seconds == pytest.approx(0.0035)
    assert l0.projection_compute_seconds == pytest.approx(0.002)
    assert l0.projection_to_ffn_seconds == pytest.approx(0.003)
    assert l0.ffn_compute_seconds == pytest.approx(0.002)
    assert l0.total_seconds == pytest.approx(0.0105)
    # Layer 1: source ffn(0) is on d1, where both attention blocks and proj are:
    #   attention 2e6/2e9 = 1 ms; proj 1 ms; d1->d0: 1 ms + 2000/0.5e6 = 5 ms; ffn on d0: 4 ms
    l1 = lat.layers[1]
    assert l1.attention_phase_seconds == pytest.approx(0.001)
    assert l1.projection_to_ffn_seconds == pytest.approx(0.005)
    assert l1.total_seconds == pytest.approx(0.011)
    assert lat.total_seconds == pytest.approx(0.0215)
    # critical-path compute: 0.5 + 2 + 2 (layer 0) + 1 + 1 + 4 (layer 1) ms
    assert lat.compute_seconds == pytest.approx(0.0105)
    assert lat.communication_seconds == pytest.approx(0.011)


def test_head_node_messages_by_hand():
    # Head node on d0: x_0 reaches d1 in 1 ms + 2000/1e6 = 3 ms, so d1's attention path is
    # 3 + 0.5 + 3 = 6.5 ms; proj also needs x_0 but it is local. The last ffn is on d0: free.
    lat = costmodel.token_latency(problem(headnode=0), PLACEMENT)
    assert lat.layers[0].attention_phase_seconds == pytest.approx(0.0065)
    assert lat.output_message_seconds == 0.0
    assert lat.total_seconds == pytest.approx(0.0245)
    # Head node on d1: layer 0 attention on d0 waits 1 + 2000/0.5e6 = 5 ms for x_0, and proj on
    # d0 too, d1's path is 0.5 + 3 ms; the output message d0 -> d1 costs 3 ms.
    lat = costmodel.token_latency(problem(headnode=1), PLACEMENT)
    assert lat.layers[0].attention_phase_seconds == pytest.approx(0.006)
    assert lat.output_message_seconds == pytest.approx(0.003)


def test_memory_and_violations_by_hand():
    pr = problem(d1_memory=80.0)
    mem = costmodel.device_memory_bytes(pr, PLACEMENT)
    # d0: attn(0,0) 10 + proj(0) 20 + ffn(1) 40; d1: 10 + 40 + 10 + 10 + 20
    assert list(mem) == [70.0, 90.0]
    (violation,) = costmodel.memory_violations(pr, PLACEMENT)
    assert violation.device == 1 and violation.used_bytes == 90.0 and violation.available_bytes == 80.0


def test_migration_and_objective_by_hand():
    pr = problem(interval_tokens=3)
    moved = Placement((0, 1, 0, 0, 1, 1, 1, 0))  # ffn(0): d1 -> d0
    ev = costmodel.evaluate(pr, moved, PLACEMENT)
    # 1 ms + 40 B / 0.5 MB/s = 1.08 ms
    (m,) = ev.migrations
    assert (m.block, m.source, m.destination) == (3, 1, 0)
    assert m.seconds == pytest.approx(0.00108)
    # layer 0 now: d1 path 3.5 ms, proj 2 ms, proj->ffn local, ffn on d0 4 ms = 9.5 ms;
    # layer 1: x_1 from d0 to d1 (3 ms) before attention (1 ms) = 4 ms, proj 1, ->d0 5, ffn 4 = 14 ms
    assert ev.token_latency_seconds == pytest.approx(0.0095 + 0.014)
    assert ev.objective_seconds == pytest.approx(3 * 0.0235 + 0.00108)


def test_evaluate_rejects_bad_placements():
    with pytest.raises(ValueError):
        costmodel.evaluate(problem(), Placement((0, 1)))
    with pytest.raises(ValueError):
        costmodel.evaluate(problem(), Placement((0, 1, 0, 1, 1, 1, 1, 2)))
