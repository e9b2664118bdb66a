"""Admission on a real cluster (controller, head node and two workers as processes, a tiny
random llama; both dataflows): what a session reserves is what the workers allocate (their own memory_used
deltas); a request over the workers' memory gets RESOURCE_EXHAUSTED (HTTP 503) before it
starts while a running generation goes on token-identical; one session over
headnode.max_sessions gets RESOURCE_EXHAUSTED (HTTP 429) until one ends; a cancelled
client frees its reservation and its caches; a worker itself refuses an allocation past its
memory instead of being killed for it; and after a worker is lost, the session the survivor
cannot hold ends with RESOURCE_EXHAUSTED while the older one completes."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest
import torch

from edgeheads.common.spec import BlockId, BlockKind
from edgeheads.common.wire import tensor_to_proto
from edgeheads.headnode.admission import ModelCost
from edgeheads.headnode.admission_control import BUDGET_MAX_AGE_SECONDS, block_weight_bytes, cache_row_bytes
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import headnode_pb2, headnode_pb2_grpc, tensor_pb2, worker_pb2, worker_pb2_grpc
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

PROMPT = list(range(3, 13))
LONG = 240  # greedy runs this many tokens without EOS on this model (seed 6): 250 in all, of 256 positions
WORKERS = ("worker-0", "worker-1")


@pytest.fixture(scope="module")
def model(save_tiny_model):
    return load_model(str(save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-admission-cluster", seed=6)),
                      progress=False)


@pytest.fixture(scope="module", params=["relay", "head"])
def cluster(model, request):
    env = {"EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": "0",  # the placement stays as the test measured it
           "EDGEHEADS_HEADNODE__MAX_SESSIONS": "2", "EDGEHEADS_HEADNODE__DATAFLOW": request.param}
    with LocalCluster(model.name, workers=len(WORKERS), progress=False, extra_env=env) as c:
        c.dataflow = request.param
        yield c


@pytest.fixture(scope="module")
def headnode(cluster):
    with grpc.insecure_channel(cluster.address) as channel:
        stub = headnode_pb2_grpc.HeadnodeStub(channel)
        assert stub.Status(headnode_pb2.StatusRequest(), timeout=10).dataflow.split("/")[0] == cluster.dataflow
        yield stub


@pytest.fixture(scope="module")
def workers(cluster):
    channels = {w: grpc.insecure_channel(cluster.addresses[w]) for w in WORKERS}
    yield {w: worker_pb2_grpc.WorkerStub(c) for w, c in channels.items()}
    for channel in channels.values():
        channel.close()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=f"http://{cluster.http_address}/v1", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def cost(model, headnode) -> ModelCost:
    """What the placement in use costs each worker, as the head node's ledger counts it."""
    placement = placement_in_use(headnode)
    assert set(placement.values()) == set(WORKERS)
    return ModelCost.of(placement, block_weight_bytes(model.parts), cache_row_bytes(model.parts))


def placement_in_use(headnode) -> dict[BlockId, str]:
    reply = headnode.Status(headnode_pb2.StatusRequest(), timeout=10)
    return {BlockId.parse(b): w for b, w in json.loads(reply.placement_json).items()}


def request(max_new_tokens: int) -> headnode_pb2.GenerateRequest:
    return headnode_pb2.GenerateRequest(prompt_token_ids=PROMPT, max_new_tokens=max_new_tokens)


def start(headnode, max_new_tokens: int = LONG):
    """A generation under way: its first token is out, so its prefill ran on every worker."""
    call = headnode.Generate(request(max_new_tokens), timeout=300)
    return call, next(call)


def used(workers) -> dict[str, int]:
    return {w: s.GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10).memory_used_bytes for w, s in workers.items()}


def headnode_metric(cluster, name: str) -> float:
    text = httpx.get(f"http://{cluster.metrics['headnode']}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def wait_until(what, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what.__doc__ or what}"
        time.sleep(0.05)


def idle(cluster, workers, weights: dict[str, int]) -> None:
    """Wait until no reservation is held and the workers hold nothing but their weights."""
    wait_until(lambda: headnode_metric(cluster, "edgeheads_admitted_sessions") == 0 and used(workers) == weights)


def test_a_session_reserves_what_the_workers_allocate_and_a_cancel_frees_both(cluster, headnode, workers, cost):
    before = used(workers)
    assert before == cost.weights  # the head node counts each worker's weights as the worker does
    call, _ = start(headnode)
    reserved = cost.kv_bytes(len(PROMPT) + LONG)
    during = used(workers)
    assert {w: during[w] - before[w] for w in WORKERS} == reserved
    for w in WORKERS:
        assert headnode_metric(cluster, f'edgeheads_reserved_kv_bytes{{worker="{w}"}}') == reserved[w]
    call.cancel()
    idle(cluster, workers, before)


def test_one_session_over_the_limit_is_refused_until_one_ends(cluster, headnode, workers, http, cost):
    running = [start(headnode)[0] for _ in range(2)]
    try:
        with pytest.raises(grpc.RpcError) as refused:
            list(headnode.Generate(request(5), timeout=60))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 sessions are running" in refused.value.details()
        reply = http.post("/completions", json={"prompt": "Hello", "max_tokens": 5})
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "too_many_sessions", reply.text
        running.pop(0).cancel()
        wait_until(lambda: headnode_metric(cluster, "edgeheads_admitted_sessions") == 1)
        events = list(headnode.Generate(request(5), timeout=60))
        assert events[-1].done
    finally:
        for call in running:
            call.cancel()
    idle(cluster, workers, cost.weights)
    assert headnode_metric(cluster, 'edgeheads_admission_refusals_total{reason="sessions"}') >= 2


def test_an_over_budget_request_is_refused_and_the_running_one_continues(cluster, headnode, workers, http, cost,
                                                                          model):
    expected = LocalGenerator(model).generate_ids(PROMPT, SamplingParams(max_new_tokens=LONG)).token_ids
    assert len(expected) == LONG
    weights = used(workers)
    room = {w: cost.kv_bytes(len(PROMPT) + LONG)[w] + cost.kv_bytes(100)[w] for w in WORKERS}
    limits = {w: weights[w] + room[w] for w in WORKERS}  # one long session and 100 more tokens
    try:
        for w, stub in workers.items():
            stub.SetMemoryLimit(worker_pb2.SetMemoryLimitRequest(memory_limit_bytes=limits[w]), timeout=10)
        time.sleep(BUDGET_MAX_AGE_SECONDS + 0.2)  # the head node reads budgets afresh
        call, first = start(headnode)
        with pytest.raises(grpc.RpcError) as refused:
            list(headnode.Generate(request(LONG), timeout=60))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.value.details()
        assert "not enough memory" in details and "250 tokens" in details and "worker-" in details, details
        assert "at most 100 tokens fit now, 350 with no other session running" in details, details
        print(f"refused: {details}")
        reply = http.post("/completions", json={"prompt": "Once upon a time", "max_tokens": 200})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "insufficient_memory", reply.text
        small = list(headnode.Generate(request(50), timeout=120))  # 60 tokens fit next to it
        assert small[-1].done
        tokens = [first.token_id] + [e.token_id for e in call if not e.done]
        assert tokens == expected  # the running generation never noticed
        assert all(used(workers)[w] <= limits[w] for w in WORKERS)
        idle(cluster, workers, weights)
        alone = [e.token_id for e in headnode.Generate(request(LONG), timeout=300) if not e.done]
        assert alone == expected  # alone, the refused request fits
    finally:
        for stub in workers.values():
            stub.SetMemoryLimit(worker_pb2.SetMemoryLimitRequest(memory_limit_bytes=0), timeout=10)
    assert headnode_metric(cluster, 'edgeheads_admission_refusals_total{reason="memory"}') >= 2


def test_a_worker_refuses_a_reservation_past_its_memory_and_keeps_serving(cluster, headnode, workers, cost, model):
    worker = next(w for w, n in cost.attention.items() if n)
    block = next(b for b, w in sorted(placement_in_use(headnode).items())
                 if w == worker and b.kind is BlockKind.ATTENTION)
    before = used(workers)[worker]
    x = tensor_to_proto(torch.zeros(1, 1, model.parts.shape.hidden_size))
    call = worker_pb2.CallRequest(session="greedy-for-memory", position=0, reserve_tokens=1 << 40,
                                  inputs=[tensor_pb2.NamedTensor(name="x", tensor=x)],
                                  ops=[worker_pb2.BlockOp(block_id=str(block), inputs=["x"], output="h")],
                                  return_values=["h"])
    with pytest.raises(grpc.RpcError) as refused:
        list(workers[worker].RunCall(iter([call]), timeout=30))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"worker {worker}: the K/V caches of session 'greedy-for-memory' need" in refused.value.details()
    assert used(workers)[worker] == before
    assert list(headnode.Generate(request(5), timeout=60))[-1].done


def test_after_a_loss_the_session_the_survivor_cannot_hold_ends_and_the_older_one_completes(model):
    """Two workers, worker-0 limited to the whole model and 300 tokens of caches: two sessions of
    250 fit while both workers hold blocks; worker-1 is killed, everything moves to worker-0, and
    the newer session ends with RESOURCE_EXHAUSTED while the older one completes token-identical."""
    expected = LocalGenerator(model).generate_ids(PROMPT, SamplingParams(max_new_tokens=LONG)).token_ids
    weights = sum(block_weight_bytes(model.parts).values())
    attention = model.parts.shape.n_layers * model.parts.shape.n_kv_heads
    limit = weights + attention * 300 * cache_row_bytes(model.parts)
    env = {"EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": "0"}
    with LocalCluster(model.name, workers=2, progress=False, extra_env=env) as cluster, \
            grpc.insecure_channel(cluster.address) as channel, \
            grpc.insecure_channel(cluster.addresses["worker-0"]) as survivor:
        worker_pb2_grpc.WorkerStub(survivor).SetMemoryLimit(
            worker_pb2.SetMemoryLimitRequest(memory_limit_bytes=limit), timeout=10)
        time.sleep(max(BUDGET_MAX_AGE_SECONDS, 1.0) + 0.5)  # the controller and the head node hear of it
        headnode = headnode_pb2_grpc.HeadnodeStub(channel)
        older, first = start(headnode)
        newer, _ = start(headnode)
        cluster.procs["worker-1"].kill()
        with pytest.raises(grpc.RpcError) as ended:
            list(newer)
        assert ended.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, ended.value.details()
        assert "the remaining workers cannot hold the K/V caches of this session" in ended.value.details()
        assert [first.token_id] + [e.token_id for e in older if not e.done] == expected
        assert placement_in_use(headnode) == {b: "worker-0" for b in model.parts.blocks}
        assert headnode_metric(cluster, 'edgeheads_admission_refusals_total{reason="evicted"}') == 1
