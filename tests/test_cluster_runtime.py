"""The distributed runtime with real processes on 127.0.0.1: a controller, 3 workers and a
head node (LocalCluster), the Python client, and exactness against the in-process engine."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from edgeheads.headnode import Client
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import from_transformers, load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.common.spec import BlockId, BlockKind
from test_recovery import Stream, wait_for_tokens
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

PROMPTS = ["The history of the Roman Empire began", "List three facts about the Moon."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smol_cluster(smollm2_gguf):
    with LocalCluster(str(smollm2_gguf), workers=3, progress=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def smol_local(smollm2):
    return LocalGenerator(from_transformers("smollm2", *smollm2))


def local_tokens(generator: LocalGenerator, prompt: str, n: int = NEW_TOKENS) -> list[int]:
    return generator.generate(prompt, SamplingParams(max_new_tokens=n)).token_ids


def assert_heads_spread(status: dict, workers: int = 3) -> None:
    placement = {BlockId.parse(b): w for b, w in status["placement"].items()}
    assert len(set(placement.values())) == workers
    layers = {b.layer for b in placement}
    for layer in layers:
        attn = {w for b, w in placement.items() if b.layer == layer and b.kind is BlockKind.ATTENTION}
        assert len(attn) > 1, f"layer {layer}: all heads on one worker"
    assert status["phases_per_token"] <= 2 * len(layers)


def test_smollm2_cluster_is_token_identical_to_in_process(smol_cluster, smol_local):
    with Client(smol_cluster.address) as client:
        for prompt in PROMPTS:
            got = client.generate_full(prompt, max_new_tokens=NEW_TOKENS)
            assert got.token_ids == local_tokens(smol_local, prompt), prompt
            assert got.text == smol_local.model.tokenizer.decode(got.token_ids, skip_special_tokens=True)
        status = client.status()
    assert_heads_spread(status)
    assert status["active_sessions"] == 0  # finished sessions are dropped


def test_two_concurrent_sessions_match_their_solo_runs(smol_cluster, smol_local):
    expected = [local_tokens(smol_local, p) for p in PROMPTS]

    def run(prompt: str) -> list[int]:
        with Client(smol_cluster.address) as client:
            return client.generate_full(prompt, max_new_tokens=NEW_TOKENS).token_ids

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(run, PROMPTS))
    assert got == expected


def test_client_stream_and_non_stream_agree(smol_cluster):
    with Client(smol_cluster.address) as client:
        text = client.generate("Name a planet.", max_new_tokens=12)
        pieces = list(client.generate("Name a planet.", max_new_tokens=12, stream=True))
    assert isinstance(text, str) and text
    assert len(pieces) > 1 and "".join(pieces) == text


def test_sampling_with_a_seed_is_repeatable_over_the_cluster(smol_cluster):
    with Client(smol_cluster.address) as client:
        a = client.generate_full("Tell me a joke.", max_new_tokens=10, temperature=0.9, top_k=50, seed=5)
        b = client.generate_full("Tell me a joke.", max_new_tokens=10, temperature=0.9, top_k=50, seed=5)
    assert a.token_ids == b.token_ids


def test_bad_generate_request_is_invalid_argument(smol_cluster):
    from edgeheads.headnode.client import ClientError

    with Client(smol_cluster.address) as client:
        with pytest.raises(ClientError, match="INVALID_ARGUMENT.*top_p"):
            client.generate("x", top_p=1.5)
        with pytest.raises(ClientError, match="INVALID_ARGUMENT.*empty prompt"):
            client.generate("")


@pytest.mark.parametrize("dataflow,policy", [("relay/tcp", "spread"), ("relay/grpc", "spread"),
                                             ("head", "round-robin")])
def test_gpt2_cluster_is_token_identical_to_in_process(save_tiny_model, dataflow, policy):
    path = save_tiny_model(TINY_CONFIGS["gpt2"], "gpt2-cluster", seed=4)
    local = LocalGenerator(load_model(str(path), progress=False))
    prompt = "Edge devices"
    expected = local.generate(prompt, SamplingParams(max_new_tokens=20)).token_ids
    flow, _, transport = dataflow.partition("/")
    env = {"EDGEHEADS_HEADNODE__DATAFLOW": flow, "EDGEHEADS_CONTROLLER__POLICY": policy}
    if transport:
        env["EDGEHEADS_HEADNODE__RELAY_TRANSPORT"] = transport
    with LocalCluster(str(path), workers=3, progress=False, extra_env=env) as cluster, \
            Client(cluster.address) as client:
        got = client.generate_full(prompt, max_new_tokens=20)
        status = client.status()
        frames = {}
        for worker in status["workers"]:
            with grpc.insecure_channel(cluster.addresses[worker]) as channel:
                frames[worker] = worker_pb2_grpc.WorkerStub(channel).GetTelemetry(
                    worker_pb2.TelemetryRequest(), timeout=10).relay_frames_received
    assert status["dataflow"] == dataflow
    # the activations took the configured way: frames on the relay ports only with tcp
    assert (sum(frames.values()) > 0) == (dataflow == "relay/tcp"), frames
    assert got.token_ids == expected
    assert_heads_spread(status)
    layers = TINY_CONFIGS["gpt2"].n_layer
    assert status["phases_per_token"] == (layers + 1 if policy == "spread" else 2 * layers)


def test_a_worker_dying_mid_generation_is_recovered_and_the_request_completes(save_tiny_model):
    """GPT-2 blocks (learned positions, no GQA) rebuilt on the survivors; tests/test_recovery.py
    covers random kills, both dataflows, hung workers and survivors without room."""
    path = save_tiny_model(TINY_CONFIGS["gpt2"], "gpt2-dying-worker", seed=5)
    expected = LocalGenerator(load_model(str(path), progress=False)).generate(
        "Edge devices", SamplingParams(max_new_tokens=60)).token_ids
    with LocalCluster(str(path), workers=3, progress=False) as cluster, Client(cluster.address) as client:
        stream = Stream(cluster.address, "Edge devices", SamplingParams(max_new_tokens=60))
        stream.start()
        wait_for_tokens(stream, 1)  # decoding has started
        cluster.procs["worker-1"].kill()
        stream.join(timeout=120)
        status = client.status()
    assert stream.error is None, stream.error
    assert stream.tokens == expected
    assert "worker-1" not in status["workers"] and len(status["workers"]) == 2
    assert status["active_sessions"] == 0  # the finished session was dropped