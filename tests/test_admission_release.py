"""Admission wired into the head node, without worker processes: the gRPC Generate service and
the HTTP API admit a request before it starts (RESOURCE_EXHAUSTED, HTTP 429 for the session
limit, 503 for memory), the steps carry the reservation to the workers, the reservation is
released however the session ends (normally, on an error, or when the client goes away), and
after a loss the sessions the survivors cannot hold end with RESOURCE_EXHAUSTED. The
cluster's dataflow is a stand-in that returns zeros (the numbers are other tests' business)."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
import torch

from edgeheads.controller.spread import WorkerCapacity, spread
from edgeheads.headnode.admission import WorkerBudget
from edgeheads.headnode.cluster import ClusterError, ClusterExecutor
from edgeheads.headnode.http_api import OpenAIApi
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.placement_feed import PlacementFeed
from edgeheads.headnode.recovery import Recovery
from edgeheads.headnode.service import HeadnodeService
from edgeheads.headnode.sessions import Epoch
from edgeheads.headnode.step_plan import compile_plan
from edgeheads.v1 import headnode_pb2
from tiny_configs import TINY_CONFIGS

WORKERS = ("w0", "w1")
PROMPT = list(range(3, 13))


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Context:
    """What Generate uses of a grpc.aio.ServicerContext."""

    def done(self) -> bool:
        return False

    async def abort(self, code, details):
        raise Aborted(code, details)


class Steps:
    """The dataflow: records each step's reservation, fails step ``fail_at`` (1-based)."""

    label = name = "fake"

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden
        self.calls: list[tuple[str, int, int]] = []  # (session, position, reserve_tokens)
        self.fail_at: int | None = None
        self.pause = asyncio.Event()
        self.pause.set()

    async def switch(self, epoch) -> None:
        pass

    async def step(self, session, position, x0, reserve_tokens=0):
        self.calls.append((session, position, reserve_tokens))
        await self.pause.wait()
        if self.fail_at is not None and len(self.calls) >= self.fail_at:
            raise ClusterError(f"worker w1 failed a step of session {session}")
        return torch.zeros(1, x0.shape[1], self.hidden)

    async def forget(self, session) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def model(save_tiny_model):
    return load_model(str(save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-admission", seed=6)), progress=False)


def cluster_of(model, max_sessions: int | None = None, room: int = 1 << 40) -> tuple[ClusterExecutor, Steps]:
    """An executor over two imaginary workers, each reporting ``room`` bytes free next to its blocks."""
    cluster = ClusterExecutor(model.parts, dataflow="head", max_sessions=max_sessions)
    steps = Steps(model.parts.shape.hidden_size)
    cluster.dataflow = steps
    cluster.sessions.forget = steps.forget
    placement = spread(model.parts.shape, [WorkerCapacity(w, 1 << 40) for w in WORKERS], 256)
    cluster.epoch = Epoch(1, placement, {}, compile_plan(model.parts.shape, placement))
    weights = cluster.admission.cost(placement).weights
    cluster.admission.budgets = {w: WorkerBudget(weights[w] + room, weights[w]) for w in WORKERS}

    async def known(workers, max_age_seconds=0.0):  # nothing to ask: the budgets above stay
        pass
    cluster.admission.refresh = known
    return cluster, steps


def request(max_new_tokens: int) -> headnode_pb2.GenerateRequest:
    return headnode_pb2.GenerateRequest(prompt_token_ids=PROMPT, max_new_tokens=max_new_tokens)


async def generate(service: HeadnodeService, max_new_tokens: int) -> list:
    return [e async for e in service.Generate(request(max_new_tokens), Context())]


def test_a_session_reserves_its_tokens_and_releases_them_when_it_ends(model):
    async def run():
        cluster, steps = cluster_of(model)
        service = HeadnodeService(model, cluster)
        events = await generate(service, 5)
        assert events[-1].done and len(events) == 6
        tokens = len(PROMPT) + 5
        assert [reserve for _, _, reserve in steps.calls] == [tokens] * 5  # every step carries it
        assert len(cluster.admission.ledger) == 0 and len(cluster.sessions) == 0
        # no more than the model's context: a session cannot run past it (Generate refuses such a
        # request as INVALID_ARGUMENT before admission; the cap guards every other caller)
        assert await cluster.admit("long", len(PROMPT), 10_000) == model.parts.shape.max_positions
        await cluster.end_session("long")
        assert len(cluster.admission.ledger) == 0
    asyncio.run(run())


def test_released_when_a_step_fails_and_when_the_client_goes_away(model):
    async def run():
        cluster, steps = cluster_of(model)
        service = HeadnodeService(model, cluster)
        steps.fail_at = 3
        with pytest.raises(Aborted) as failed:
            await generate(service, 5)
        assert failed.value.code is grpc.StatusCode.UNAVAILABLE
        assert len(cluster.admission.ledger) == 0 and len(cluster.sessions) == 0
        steps.fail_at = None
        stream = service.Generate(request(50), Context())
        await anext(stream)
        assert len(cluster.admission.ledger) == 1
        await stream.aclose()  # what a cancelled RPC does to the handler
        assert len(cluster.admission.ledger) == 0 and len(cluster.sessions) == 0
    asyncio.run(run())


def test_the_session_limit_refuses_one_more_until_one_ends(model):
    async def run():
        cluster, steps = cluster_of(model, max_sessions=2)
        service = HeadnodeService(model, cluster)
        running = [service.Generate(request(50), Context()) for _ in range(2)]
        for stream in running:
            await anext(stream)
        before = len(steps.calls)
        with pytest.raises(Aborted) as refused:
            await generate(service, 5)
        assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 sessions are running" in refused.value.details and "headnode.max_sessions" in refused.value.details
        assert len(steps.calls) == before  # refused before its first step
        await running[0].aclose()
        assert len(await generate(service, 5)) == 6
        await running[1].aclose()
        assert len(cluster.admission.ledger) == 0
    asyncio.run(run())


def test_a_request_whose_caches_do_not_fit_is_refused_before_it_starts(model):
    async def run():
        cluster, steps = cluster_of(model, room=0)
        room = cluster.admission.cost(cluster.epoch.placement).kv_bytes(100)  # 100 tokens fit on every worker
        for w in WORKERS:
            b = cluster.admission.budgets[w]
            cluster.admission.budgets[w] = WorkerBudget(b.available + room[w], b.used)
        service = HeadnodeService(model, cluster)
        running = service.Generate(request(80), Context())  # 90 tokens
        await anext(running)
        before = len(steps.calls)
        with pytest.raises(Aborted) as refused:
            await generate(service, 20)  # 30 more do not fit next to it
        assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.value.details
        assert "not enough memory" in details and "30 tokens (prompt 10 + max_new_tokens 20)" in details
        assert "at most 10 tokens fit now, 100 with no other session running" in details
        assert len(steps.calls) == before and len(cluster.admission.ledger) == 1
        await running.aclose()
        assert len(await generate(service, 20)) == 21  # alone it fits
    asyncio.run(run())


async def post(app, route: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api/v1") as client:
        return await client.post(route, json=body)


@pytest.mark.parametrize("stream", [False, True])
def test_the_http_api_refuses_with_429_for_sessions_and_503_for_memory(model, stream):
    async def run():
        cluster, steps = cluster_of(model, max_sessions=1, room=0)
        room = cluster.admission.cost(cluster.epoch.placement).kv_bytes(100)
        for w in WORKERS:
            b = cluster.admission.budgets[w]
            cluster.admission.budgets[w] = WorkerBudget(b.available + room[w], b.used)
        app = OpenAIApi(model, cluster).app()
        body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": stream}
        reply = await post(app, "/completions", body)
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert error["code"] == "insufficient_memory" and error["type"] == "server_error"
        assert "not enough memory" in error["message"] and "at most 100 tokens fit" in error["message"]
        assert steps.calls == [] and len(cluster.admission.ledger) == 0

        running = HeadnodeService(model, cluster).Generate(request(20), Context())
        await anext(running)
        reply = await post(app, "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 5, "stream": stream})
        assert reply.status_code == 429, reply.text
        error = reply.json()["error"]
        assert error["code"] == "too_many_sessions" and "headnode.max_sessions" in error["message"]
        await running.aclose()
        reply = await post(app, "/completions", {**body, "max_tokens": 5})
        assert reply.status_code == 200, reply.text
        assert len(cluster.admission.ledger) == 0  # released after the reply, streamed or not
    asyncio.run(run())


def test_after_a_loss_the_sessions_the_survivors_cannot_hold_end_with_resource_exhausted(model):
    async def run():
        cluster, steps = cluster_of(model, room=0)
        room = cluster.admission.cost(cluster.epoch.placement).kv_bytes(100)
        for w in WORKERS:
            b = cluster.admission.budgets[w]
            cluster.admission.budgets[w] = WorkerBudget(b.available + room[w], b.used)
        service = HeadnodeService(model, cluster)
        older, newer = service.Generate(request(50), Context()), service.Generate(request(30), Context())
        await anext(older)  # 60 tokens
        await anext(newer)  # 40: 100 in all
        # w1 is lost and everything lands on w0, which has room for 70 tokens of its caches
        placement = {b: "w0" for b in cluster.epoch.placement}
        cost = cluster.admission.cost(placement)
        cluster.admission.budgets = {"w0": WorkerBudget(cost.weights["w0"] + cost.kv_bytes(70)["w0"], 12345)}
        cluster.epoch = Epoch(2, placement, {}, compile_plan(model.parts.shape, placement))
        names = list(cluster.sessions)
        left = await Recovery(cluster, PlacementFeed())._evict(names, "lost w1")
        assert left == names[:1] and list(cluster.admission.ledger.tokens) == names[:1]
        with pytest.raises(Aborted) as ended:
            await anext(newer)
        assert ended.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "recovering (lost w1): the remaining workers cannot hold" in ended.value.details
        assert (await anext(older)).token_id >= 0  # the older one goes on
        await older.aclose()
        assert len(cluster.admission.ledger) == 0 and len(cluster.sessions) == 0
    asyncio.run(run())
