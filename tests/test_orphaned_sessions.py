"""Sessions whose driver is gone leave nothing on the workers, with real processes, in both
dataflows (docs/recovery.md, "Daemons that come and go"):

- a gRPC client that cancels mid-stream and an HTTP client that disconnects: the head node
  ends the session at once, and every worker drops its caches (sessions 0, memory back to
  what the weights take), long before any TTL;
- a head node SIGKILLed mid-generation: every worker drops the orphaned session after
  ``worker.session_ttl_seconds`` and its memory returns; a generation longer than the TTL
  is never dropped; a head node started again serves as before.
"""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from cluster_watch import headnode_status, wait_until, worker_telemetry
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import headnode_pb2, headnode_pb2_grpc
from test_recovery import Stream, generate, wait_for_tokens
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

PROMPT = "Once upon a time there was"
PROMPTS = [PROMPT, "Blocks on the move", "Tell me a joke", "The cluster goes on"]
TTL_SECONDS = 3.0  # long enough that a loaded machine's gap between two steps of a live session is no kill
LONG = SamplingParams(max_new_tokens=200)


@pytest.fixture(scope="module")
def tiny(save_tiny_model):
    path = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-orphans", seed=5)
    return path, LocalGenerator(load_model(str(path), progress=False))


def workers(cluster: LocalCluster) -> list[str]:
    return sorted(n for n in cluster.addresses if n.startswith("worker-"))


def weights_only(cluster: LocalCluster) -> dict[str, int]:
    """Each worker's memory in use with no session: its blocks' weights."""
    usage = {w: worker_telemetry(cluster.addresses[w]) for w in workers(cluster)}
    assert all(t.sessions == 0 and t.blocks for t in usage.values())
    return {w: t.memory_used_bytes for w, t in usage.items()}


def sessions_held(cluster: LocalCluster) -> int:
    return sum(worker_telemetry(cluster.addresses[w]).sessions for w in workers(cluster))


def nothing_left(cluster: LocalCluster, baseline: dict[str, int]) -> bool:
    usage = {w: worker_telemetry(cluster.addresses[w]) for w in workers(cluster)}
    return all(t.sessions == 0 and t.memory_used_bytes == baseline[w] for w, t in usage.items())


@pytest.mark.parametrize("dataflow", ["relay", "head"])
def test_a_client_that_vanishes_mid_stream_leaves_nothing_on_any_worker(tiny, dataflow):
    path, _ = tiny
    with LocalCluster(str(path), workers=3, progress=False,
                      extra_env={"EDGEHEADS_HEADNODE__DATAFLOW": dataflow}) as cluster:  # the default TTL: 300 s
        baseline = weights_only(cluster)
        request = headnode_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=LONG.max_new_tokens)
        with grpc.insecure_channel(cluster.address) as channel:
            call = headnode_pb2_grpc.HeadnodeStub(channel).Generate(request, timeout=120)
            for _, event in zip(range(3), call):
                assert not event.done
            assert sessions_held(cluster) > 0
            call.cancel()
        wait_until(lambda: nothing_left(cluster, baseline), 20, "the workers dropped the cancelled session")
        assert headnode_status(cluster.address).active_sessions == 0
        body = {"prompt": PROMPT, "max_tokens": LONG.max_new_tokens, "stream": True}
        with httpx.Client(base_url=f"http://{cluster.http_address}/v1", timeout=60) as http:
            with http.stream("POST", "/completions", json=body) as reply:
                assert reply.status_code == 200
                lines = reply.iter_lines()
                next(lines)
                next(lines)
                # the first event may go out before the prefill reaches every worker
                wait_until(lambda: sessions_held(cluster) > 0, 20, "the workers hold the streaming session")
        wait_until(lambda: nothing_left(cluster, baseline), 20, "the workers dropped the abandoned HTTP session")
        assert headnode_status(cluster.address).active_sessions == 0


@pytest.mark.parametrize("dataflow", ["relay", "head"])
def test_a_killed_head_nodes_sessions_are_dropped_after_the_ttl(tiny, dataflow):
    path, local = tiny
    expected = [local.generate(p, LONG).token_ids for p in PROMPTS]
    env = {"EDGEHEADS_HEADNODE__DATAFLOW": dataflow, "EDGEHEADS_WORKER__SESSION_TTL_SECONDS": str(TTL_SECONDS)}
    with LocalCluster(str(path), workers=3, progress=False, extra_env=env) as cluster:
        baseline = weights_only(cluster)
        start = time.monotonic()
        # side by side, six of each: each takes longer, here several times the TTL
        streams = [Stream(cluster.address, p, LONG) for p in PROMPTS * 6]
        for stream in streams:
            stream.start()
        for stream, want in zip(streams, expected * 6):  # calls keep a session alive, however long it runs
            stream.join(timeout=120)
            assert stream.error is None and stream.tokens == want, stream.error
        took = time.monotonic() - start
        assert took > 1.5 * TTL_SECONDS, f"the generations took {took:.1f} s: too short to outlive the TTL"
        stream = Stream(cluster.address, PROMPT, LONG)
        stream.start()
        wait_for_tokens(stream, 10)
        held = sessions_held(cluster)  # before the kill: after it, a slow check could see the TTL's work done
        cluster.procs["headnode"].kill()
        killed = time.monotonic()
        stream.join(timeout=30)
        assert stream.error is not None and stream.error.code() is grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: nothing_left(cluster, baseline), 10 * TTL_SECONDS, "the workers dropped the orphans")
        freed = time.monotonic() - killed
        logs = {w: cluster.log_tail(w, 20) for w in workers(cluster)}
        cluster.restart("headnode", same_address=False)
        assert generate(cluster.address, PROMPT, LONG) == expected[0]
        wait_until(lambda: nothing_left(cluster, baseline), 20, "the new head node's session ended everywhere")
    assert held > 0, "no worker held the session at the kill: the TTL was not what freed it"
    assert freed >= TTL_SECONDS, f"freed {freed:.1f} s after the kill, before the TTL"
    assert any(f"no call for {TTL_SECONDS:g} s" in log for log in logs.values()), logs
