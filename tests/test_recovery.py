"""Recovery from a lost worker, with real processes: a worker SIGKILLed at a random step of
two concurrent generations (one greedy, one sampled with a seed), in both dataflows, and
every generation completes with the tokens of an undisturbed run; two workers lost while
blocks migrate every few tokens; a hung worker (found by the step timeout and the
controller's heartbeat timeout); survivors that cannot hold the
model end the sessions with RESOURCE_EXHAUSTED, and the cluster serves again once a
worker joins or the survivors get more memory.

Each kill run prints its seed, victim and step: rerun one with
``pytest tests/test_recovery.py -k "relay and 3" -s``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import grpc
import pytest

from edgeheads.common.spec import block_memory_bytes
from edgeheads.controller.spread import InfeasiblePlacement, WorkerCapacity, spread
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import headnode_pb2, headnode_pb2_grpc, worker_pb2, worker_pb2_grpc
from test_live_migration import scrape
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

NEW_TOKENS = 40
PROMPTS = ["Blocks on the move", "Tell me a joke"]
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)
KILL_TOKENS = 120  # the kill test's generations run on well after the kill: the tiny model is fast


def sampled(seed: int, tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0.8, top_p=0.95, seed=1000 + seed)


@pytest.fixture(scope="module")
def tiny(save_tiny_model):
    path = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-recovery", seed=3)
    model = load_model(str(path), progress=False)
    return path, model, LocalGenerator(model)


class Stream(threading.Thread):
    """One Generate call on its own thread; ``tokens`` grows as they arrive."""

    def __init__(self, address: str, prompt: str, params: SamplingParams) -> None:
        super().__init__(daemon=True)
        self.address, self.prompt, self.params = address, prompt, params
        self.tokens: list[int] = []
        self.error: grpc.RpcError | None = None
        self.started_generating = threading.Event()

    def run(self) -> None:
        p = self.params
        request = headnode_pb2.GenerateRequest(prompt=self.prompt, max_new_tokens=p.max_new_tokens,
                                               temperature=p.temperature, top_p=p.top_p, seed=p.seed)
        with grpc.insecure_channel(self.address) as channel:
            try:
                for event in headnode_pb2_grpc.HeadnodeStub(channel).Generate(request, timeout=300):
                    if not event.done:
                        self.tokens.append(event.token_id)
            except grpc.RpcError as err:
                self.error = err


def wait_for_tokens(stream: Stream, count: int, timeout_seconds: float = 120) -> None:
    deadline = time.monotonic() + timeout_seconds
    while len(stream.tokens) < count:
        assert stream.is_alive(), f"the generation ended after {len(stream.tokens)} tokens: {stream.error}"
        assert time.monotonic() < deadline, f"only {len(stream.tokens)} of {count} tokens arrived"
        time.sleep(0.001)


def wait_for_a_session(address: str, timeout_seconds: float = 60) -> None:
    """Until the head node has a live session (its first step has begun)."""
    deadline = time.monotonic() + timeout_seconds
    with grpc.insecure_channel(address) as channel:
        stub = headnode_pb2_grpc.HeadnodeStub(channel)
        while not stub.Status(headnode_pb2.StatusRequest(), timeout=10).active_sessions:
            assert time.monotonic() < deadline, "no session started"
            time.sleep(0.001)


def generate(address: str, prompt: str, params: SamplingParams = GREEDY) -> list[int]:
    stream = Stream(address, prompt, params)
    stream.run()
    if stream.error is not None:
        raise stream.error
    return stream.tokens


def recoveries(cluster: LocalCluster) -> dict[str, float]:
    samples = scrape(cluster.metrics["headnode"])
    return {key: value for key, value in samples.items()
            if any(word in key for word in ("recover", "replayed", "migrations")) and "_total" in key}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dataflow", ["relay", "head"])
def test_a_worker_killed_at_a_random_step_changes_no_token_of_two_sessions(tiny, dataflow, seed):
    path, _, local = tiny
    params = [SamplingParams(max_new_tokens=KILL_TOKENS), sampled(seed, KILL_TOKENS)]
    expected = [local.generate(p, q).token_ids for p, q in zip(PROMPTS, params)]
    assert len(expected[0]) == KILL_TOKENS  # no early EOS: the kill lands mid-generation
    rng = random.Random(f"recovery-{dataflow}-{seed}")
    victim = rng.choice(["worker-0", "worker-1", "worker-2"])
    after = rng.randrange(0, NEW_TOKENS // 2)  # tokens of session 0 before the kill; 0: during the prefill
    print(f"\nrandom.Random(\"recovery-{dataflow}-{seed}\"): SIGKILL {victim} after {after} tokens of session 0")
    # the default re-plans every 16 tokens: after the repair placement (only the lost blocks
    # moved), the next one migrates live to the policy's own placement on the survivors
    env = {"EDGEHEADS_HEADNODE__DATAFLOW": dataflow}
    with LocalCluster(str(path), workers=3, progress=False, extra_env=env) as cluster:
        streams = [Stream(cluster.address, p, q) for p, q in zip(PROMPTS, params)]
        for stream in streams:
            stream.start()
        wait_for_tokens(streams[0], after)
        if after == 0:
            wait_for_a_session(cluster.address)
        os.kill(cluster.procs[victim].pid, signal.SIGKILL)
        killed_at = [len(s.tokens) for s in streams]
        assert killed_at[0] < KILL_TOKENS, f"session 0 ended ({killed_at[0]} tokens) before the kill landed"
        for stream in streams:
            stream.join(timeout=240)
        counts = recoveries(cluster)
        log = cluster.log_tail("headnode", 40)
    print(f"killed when the sessions had {killed_at} tokens; head node metrics: {counts}")
    for stream, want in zip(streams, expected):
        assert not stream.is_alive(), "a generation did not finish"
        assert stream.error is None, f"{stream.error.code().name}: {stream.error.details()}\n{log}"
        assert stream.tokens == want, log
    assert counts['edgeheads_recoveries_total{result="ok"}'] == 1, log
    assert counts["edgeheads_recovered_sessions_total"] >= 1, log
    assert counts['edgeheads_recovery_bytes_total{kind="weights"}'] > 0
    assert counts.get('edgeheads_migrations_total{result="abandoned"}', 0) == 0, log


def test_two_workers_lost_while_blocks_migrate_every_few_tokens(tiny):
    """Recovery and live migration take turns: the shuffle policy moves blocks every 6 tokens,
    and two of four workers are killed, the first one a source of migrations in flight."""
    path, _, local = tiny
    params = SamplingParams(max_new_tokens=80)
    expected = [local.generate(p, params).token_ids for p in PROMPTS]
    env = {"EDGEHEADS_CONTROLLER__POLICY": "shuffle", "EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": "6",
           "EDGEHEADS_CONTROLLER__SHUFFLE_MOVES": "3"}
    with LocalCluster(str(path), workers=4, progress=False, extra_env=env) as cluster:
        streams = [Stream(cluster.address, p, params) for p in PROMPTS]
        for stream in streams:
            stream.start()
        for victim, after in (("worker-1", 15), ("worker-3", 45)):
            wait_for_tokens(streams[0], after)
            cluster.procs[victim].kill()
        for stream in streams:
            stream.join(timeout=240)
        counts = recoveries(cluster)
        log = cluster.log_tail("headnode", 40)
    for stream, want in zip(streams, expected):
        assert stream.error is None, f"{stream.error.code().name}: {stream.error.details()}\n{log}"
        assert stream.tokens == want, log
    assert counts['edgeheads_recoveries_total{result="ok"}'] == 2, log
    assert counts['edgeheads_migrations_total{result="ok"}'] >= 3, log


def test_a_hung_worker_is_found_by_timeouts_and_recovered(tiny):
    """SIGSTOP keeps the worker's connections open: the head node's step timeout and the
    controller's heartbeat timeout find it, not a reset."""
    path, _, local = tiny
    expected = local.generate(PROMPTS[0], GREEDY).token_ids
    env = {"EDGEHEADS_HEADNODE__STEP_TIMEOUT_SECONDS": "4", "EDGEHEADS_CONTROLLER__HEARTBEAT_TIMEOUT_SECONDS": "3",
           "EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": "0"}
    with LocalCluster(str(path), workers=3, progress=False, extra_env=env) as cluster:
        stream = Stream(cluster.address, PROMPTS[0], GREEDY)
        stream.start()
        wait_for_tokens(stream, 5)
        hung = cluster.procs["worker-2"]
        os.kill(hung.pid, signal.SIGSTOP)
        try:
            stream.join(timeout=120)
            counts = recoveries(cluster)
            log = cluster.log_tail("headnode", 40)
        finally:
            hung.kill()
    assert stream.error is None, f"{stream.error.code().name}: {stream.error.details()}\n{log}"
    assert stream.tokens == expected
    assert counts['edgeheads_recoveries_total{result="ok"}'] == 1, log
    assert "no result within 4 s" in log or "leaves out worker-2" in log, log


def tight_memory_limit(shape) -> int:
    """A per-worker memory limit with which three workers hold the model and two do not."""
    context = min(2048, shape.max_positions)  # what the controller plans caches for

    def fits(workers: int, limit: int) -> bool:
        try:
            spread(shape, [WorkerCapacity(f"w{i}", limit) for i in range(workers)], context)
        except InfeasiblePlacement:
            return False
        return True
    low, high = 1, 1 << 40
    while low < high:  # the smallest limit three workers fit in
        mid = (low + high) // 2
        low, high = (low, mid) if fits(3, mid) else (mid + 1, high)
    limit = int(low * 1.05)
    total = sum(block_memory_bytes(shape, b.kind, context) for b in shape.block_ids())
    assert fits(3, limit) and 2 * limit < total, "the tiny model cannot be sized for this test"
    return limit


def serves_again(address: str, prompt: str, timeout_seconds: float = 60) -> list[int]:
    """Generate once the head node has taken in a placement that fits (RESOURCE_EXHAUSTED until then)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            return generate(address, prompt)
        except grpc.RpcError as err:
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, err
            time.sleep(0.2)


def killed_mid_generation_is_resource_exhausted(cluster: LocalCluster, victim: str) -> None:
    stream = Stream(cluster.address, PROMPTS[1], SamplingParams(max_new_tokens=200))
    stream.start()
    wait_for_tokens(stream, 3)
    cluster.procs[victim].kill()
    stream.join(timeout=120)
    assert stream.error is not None, "the generation went on without room for the model"
    assert stream.error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, stream.error.details()
    assert "cannot hold the model" in stream.error.details() and victim in stream.error.details()
    with pytest.raises(grpc.RpcError) as refused:  # new requests too, at once
        generate(cluster.address, PROMPTS[0])
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_survivors_that_cannot_hold_the_model_say_resource_exhausted_until_memory_returns(tiny):
    """Memory returns twice: a worker joins, then (after that one is lost too) the survivors'
    memory limits are raised at runtime."""
    path, model, local = tiny
    expected = local.generate(PROMPTS[0], GREEDY).token_ids
    limit = tight_memory_limit(model.parts.shape)
    env = {"EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": "0"}
    with LocalCluster(str(path), workers=3, progress=False, extra_env=env, worker_memory_limit_bytes=limit) as cluster:
        killed_mid_generation_is_resource_exhausted(cluster, "worker-1")
        joined = cluster.add_worker()
        assert serves_again(cluster.address, PROMPTS[0]) == expected
        killed_mid_generation_is_resource_exhausted(cluster, joined)
        for survivor in ("worker-0", "worker-2"):
            with grpc.insecure_channel(cluster.addresses[survivor]) as channel:
                worker_pb2_grpc.WorkerStub(channel).SetMemoryLimit(
                    worker_pb2.SetMemoryLimitRequest(memory_limit_bytes=2 * limit), timeout=10)
        assert serves_again(cluster.address, PROMPTS[0]) == expected
        counts = recoveries(cluster)
    assert counts['edgeheads_recoveries_total{result="no_capacity"}'] == 2
    assert counts['edgeheads_recoveries_total{result="ok"}'] == 2
