"""The head node's Generate over gRPC, end to end from the Python client, with the real service,
the tiny tokenizer and a fake cluster whose step returns fixed logits: sampling parameters must
arrive at the sampler, and the streamed text must add up to the decoded tokens."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import grpc
import pytest
import torch

from edgeheads.headnode.client import Client, ClientError
from edgeheads.headnode.service import HeadnodeService
from edgeheads.v1 import headnode_pb2_grpc
from tiny_configs import VOCAB

# A clear favourite (token 40), but every other token is likely enough at a high temperature.
LOGITS = torch.zeros(VOCAB)
LOGITS[40] = 2.0


class FakeCluster:
    """The ClusterExecutor surface Generate uses: admit, a coroutine step, end_session."""

    def __init__(self) -> None:
        self.script: list[int] | None = None  # when set: greedy-winning tokens in this order
        self.steps: list[tuple[str, list[int]]] = []
        self.ended: list[str] = []
        self.sessions: dict = {}
        self.admitted: list[tuple[str, int, int]] = []

    async def admit(self, session: str, prompt_tokens: int, max_new_tokens: int) -> int:
        self.admitted.append((session, prompt_tokens, max_new_tokens))
        return prompt_tokens + max_new_tokens

    async def step(self, session: str, ids: list[int]) -> torch.Tensor:
        self.steps.append((session, list(ids)))
        if self.script is None:
            return LOGITS
        logits = torch.zeros(VOCAB)
        logits[self.script[len(self.steps) - 1]] = 10.0
        return logits

    async def end_session(self, session: str) -> None:
        self.ended.append(session)


@pytest.fixture
def served(tiny_tokenizer):
    """(address, cluster): a HeadnodeService on a loopback port, its event loop in a thread."""
    cluster = FakeCluster()
    model = SimpleNamespace(name="tiny", tokenizer=tiny_tokenizer, eos_token_ids=[tiny_tokenizer.eos_token_id],
                            parts=SimpleNamespace(shape=SimpleNamespace(vocab_size=VOCAB, max_positions=256)))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    async def start() -> None:
        server = grpc.aio.server()
        headnode_pb2_grpc.add_HeadnodeServicer_to_server(HeadnodeService(model, cluster), server)
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box["server"] = server
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    assert started.is_set()
    try:
        yield f"127.0.0.1:{box['port']}", cluster
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].stop(None), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_temperature_travels_to_the_sampler(served):
    """Greedy always picks the favourite; with the temperature it must not, and a seed repeats.
    Fails if the client, the wire or the service drops temperature (or seed)."""
    address, _ = served
    with Client(address) as client:
        greedy = client.generate_full("Hi", max_new_tokens=24, chat=False).token_ids
        hot = client.generate_full("Hi", max_new_tokens=24, temperature=3.0, seed=5, chat=False).token_ids
        again = client.generate_full("Hi", max_new_tokens=24, temperature=3.0, seed=5, chat=False).token_ids
        other_seed = client.generate_full("Hi", max_new_tokens=24, temperature=3.0, seed=6, chat=False).token_ids
        hot_top1 = client.generate_full("Hi", max_new_tokens=24, temperature=3.0, top_k=1, seed=5,
                                        chat=False).token_ids
    assert greedy == [40] * 24
    assert len(set(hot)) > 5  # at T=3 the favourite has about 2% of the mass
    assert hot == again and hot != other_seed
    assert hot_top1 == greedy  # top_k arrives too


def test_the_prompt_is_encoded_with_the_chat_template_and_sessions_end(served, tiny_tokenizer):
    address, cluster = served
    with Client(address) as client:
        client.generate_full("Hello", max_new_tokens=3)
    prompt = cluster.steps[0][1]
    assert tiny_tokenizer.decode(prompt).startswith("<|im_start|>user\nHello<|im_end|>")
    assert [ids for _, ids in cluster.steps[1:]] == [[40], [40]]
    assert cluster.ended == [cluster.steps[0][0]]


def test_streamed_text_adds_up_to_the_decoded_tokens_even_when_eos_cuts_a_character(served, tiny_tokenizer):
    address, cluster = served
    tokens = tiny_tokenizer(" fine 🙂", add_special_tokens=False).input_ids[:-1]  # the emoji is cut short
    cluster.script = [*tokens, tiny_tokenizer.eos_token_id]
    with Client(address) as client:
        full = client.generate_full("x", max_new_tokens=50, chat=False)
        cluster.steps.clear()
        pieces = list(client.generate("x", max_new_tokens=50, chat=False, stream=True))
    assert full.token_ids == tokens and full.finish_reason == "eos"
    assert full.text == "".join(pieces) == tiny_tokenizer.decode(tokens)
    assert full.text.startswith(" fine ")


def test_ignore_eos_runs_to_max_new_tokens_through_an_end_of_sequence(served, tiny_tokenizer):
    address, cluster = served
    eos = tiny_tokenizer.eos_token_id
    cluster.script = [40, eos, 41, 42, eos, 43]
    with Client(address) as client:
        stopped = client.generate_full("x", max_new_tokens=6, chat=False)
        cluster.steps.clear()
        through = client.generate_full("x", max_new_tokens=6, chat=False, ignore_eos=True)
    assert stopped.token_ids == [40] and stopped.finish_reason == "eos"
    assert through.token_ids == [40, eos, 41, 42, eos, 43] and through.finish_reason == "length"


def test_bad_sampling_parameters_are_invalid_argument(served):
    address, _ = served
    with Client(address) as client:
        with pytest.raises(ClientError, match="INVALID_ARGUMENT.*top_p"):
            client.generate("x", top_p=1.5)
        with pytest.raises(ClientError, match="INVALID_ARGUMENT.*empty prompt"):
            client.generate("")
