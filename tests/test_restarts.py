"""Daemons that come and go, with real processes (docs/recovery.md, "Daemons that come and go"):

- the controller SIGKILLed mid-generation: the generation completes with the same tokens, new
  ones run while it is away, and a new controller on the same address takes over the head
  node's placement (nothing moves), numbers its epochs on from it and drives the cluster;
- a worker SIGKILLed mid-generation and started again under its name on another port: the
  generation completes with the same tokens and the worker gets blocks again;
- a worker SIGKILLed and started again at its address while the controller is away: the head
  node finds it without its blocks and rebuilds it in place, without the controller.
"""

from __future__ import annotations

import pytest

from cluster_watch import controller_status, headnode_status, placement, wait_until, worker_telemetry
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from test_recovery import Stream, generate, wait_for_tokens
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

PROMPTS = ["Blocks on the move", "Tell me a joke"]
GREEDY = SamplingParams(max_new_tokens=60)
LONG = SamplingParams(max_new_tokens=200)  # runs on well after a kill: the tiny model is fast


@pytest.fixture(scope="module")
def tiny(save_tiny_model):
    path = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-restarts", seed=3)
    local = LocalGenerator(load_model(str(path), progress=False))
    expected = [local.generate(p, GREEDY).token_ids for p in PROMPTS]
    assert all(len(e) == GREEDY.max_new_tokens for e in expected)  # no early EOS: kills land mid-generation
    long = local.generate(PROMPTS[0], LONG).token_ids
    assert len(long) == LONG.max_new_tokens
    return path, expected, long


def finish(stream: Stream, cluster: LocalCluster) -> list[int]:
    stream.join(timeout=240)
    log = cluster.log_tail("headnode", 40)
    assert not stream.is_alive(), f"the generation did not finish\n{log}"
    assert stream.error is None, f"{stream.error.code().name}: {stream.error.details()}\n{log}"
    return stream.tokens


def kill_mid_generation(cluster: LocalCluster, stream: Stream, *names: str) -> None:
    wait_for_tokens(stream, 5)
    for name in names:
        cluster.procs[name].kill()
    assert len(stream.tokens) < stream.params.max_new_tokens, "the generation ended before the kill"


def controller_caught_up(cluster: LocalCluster, workers: set[str]):
    """The controller's status once it knows the model, every worker in ``workers`` and the
    head node's epoch."""
    status = controller_status(cluster.addresses["controller"])
    head = headnode_status(cluster.address)
    ok = status.model and {w.name for w in status.workers} >= workers and status.epoch == head.epoch
    return status if ok else None


def test_a_killed_controller_is_not_missed_and_a_new_one_takes_over_the_placement(tiny):
    path, expected, long = tiny
    with LocalCluster(str(path), workers=3, progress=False) as cluster:
        before = placement(cluster.address)
        stream = Stream(cluster.address, PROMPTS[0], LONG)
        stream.start()
        kill_mid_generation(cluster, stream, "controller")
        assert finish(stream, cluster) == long
        assert generate(cluster.address, PROMPTS[1], GREEDY) == expected[1]  # a new session while it is away
        cluster.restart("controller")
        workers = {f"worker-{i}" for i in range(3)}
        taken_over = wait_until(lambda: controller_caught_up(cluster, workers), 60, "the new controller caught up")
        assert generate(cluster.address, PROMPTS[0], GREEDY) == expected[0]
        assert placement(cluster.address) == before  # nothing moved
        # the new controller drives the cluster: a worker joins, it re-plans, the head node migrates
        joined = cluster.add_worker()
        wait_until(lambda: joined in placement(cluster.address).values(), 60, f"{joined} got blocks")
        assert generate(cluster.address, PROMPTS[1], GREEDY) == expected[1]
        after = controller_status(cluster.addresses["controller"])
        log = cluster.log_tail("controller", 30)
    takeover = [d for d in taken_over.decisions if "taken over" in d.reason]
    assert takeover and takeover[0].blocks_moved == 0, log
    assert after.epoch == taken_over.epoch + 1, log  # its epochs go on from the head node's


def test_a_worker_restarted_under_its_name_on_another_port_gets_blocks_again(tiny):
    path, expected, long = tiny
    with LocalCluster(str(path), workers=3, progress=False) as cluster:
        stream = Stream(cluster.address, PROMPTS[0], LONG)
        stream.start()
        old = cluster.addresses["worker-1"]
        kill_mid_generation(cluster, stream, "worker-1")
        new = cluster.restart("worker-1", same_address=False)
        assert new != old
        assert finish(stream, cluster) == long
        blocks = wait_until(lambda: {b for b, w in placement(cluster.address).items() if w == "worker-1"}, 60,
                            "worker-1 got blocks again")
        assert set(worker_telemetry(new).blocks) >= blocks
        assert generate(cluster.address, PROMPTS[1], GREEDY) == expected[1]
        log = cluster.log_tail("headnode", 80)
    print("\n".join(line for line in log.splitlines() if "worker-1" in line or "recover" in line))


def test_a_worker_restarted_at_its_address_while_the_controller_is_away_is_rebuilt_in_place(tiny):
    path, expected, long = tiny
    env = {"EDGEHEADS_HEADNODE__DATAFLOW": "head"}
    with LocalCluster(str(path), workers=3, progress=False, extra_env=env) as cluster:
        before = placement(cluster.address)
        held = {b for b, w in before.items() if w == "worker-1"}
        stream = Stream(cluster.address, PROMPTS[0], LONG)
        stream.start()
        kill_mid_generation(cluster, stream, "controller", "worker-1")
        cluster.restart("worker-1", wait=False)  # it registers only once a controller is back
        wait_until(lambda: worker_telemetry(cluster.addresses["worker-1"]), 60, "worker-1 serving again")
        assert finish(stream, cluster) == long
        assert set(worker_telemetry(cluster.addresses["worker-1"]).blocks) == held
        assert placement(cluster.address) == before
        log = cluster.log_tail("headnode", 60)
        assert "worker-1 restarted" in log or "worker-1 answers again" in log, log
        cluster.restart("controller")
        wait_until(lambda: controller_caught_up(cluster, {f"worker-{i}" for i in range(3)}), 60,
                   "the new controller caught up")
        assert generate(cluster.address, PROMPTS[1], GREEDY) == expected[1]
        assert placement(cluster.address) == before
