"""Weight formats over real processes: a 3-worker LocalCluster started with ``--dtype FMT``
generates the same greedy tokens as the in-process engine on ``load_model(path, FMT)``, and
its workers report the bytes their blocks really hold (q4 a fraction of fp32).

One cluster per (model, format), each ~20-30 s to start on a shared 2-core machine, so the
file runs six: SmolLM2 in q4 (its GGUF read as stored) and bf16 (floats converted), and the
tiny models in the four formats between them: gpt2 (64 wide, so q4 groups fit) in q4 and
bf16, llama-gqa in int8 and fp16. Dropped: gpt2 int8/fp16, llama-gqa q4/bf16 (llama q4 and
bf16 run on SmolLM2; every format and kernel on every tiny model runs in-process in
tests/test_kernels.py). fp32 identity with transformers: tests/test_cluster_runtime.py.

Kernels are pinned to each format's preferred one (``EDGEHEADS_KERNELS``) in this process
and the cluster's: left to measurement, a loaded machine can time a kernel 100x off and two
processes then choose differently and round differently (worker/kernel_probe.py), which is
a property of the probe, not of the formats tested here.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from edgeheads.common.spec import block_params
from edgeheads.headnode import Client
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import LoadedModel, from_transformers, load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.parts_format import convert_parts
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.worker import kernel_probe, kernels
from test_kernels import GPT2_Q4
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

NEW_TOKENS = 16
PINS = ",".join(f"{fmt}={order[0]}" for fmt, order in kernels.PREFERENCE.items())


@pytest.fixture(autouse=True)
def pinned_kernels(monkeypatch):
    """The preferred kernel of every format, here (no probe done yet) and in the cluster."""
    monkeypatch.setenv(kernel_probe.ENV, PINS)
    monkeypatch.setattr(kernel_probe, "_done", {})
    monkeypatch.setattr(kernels, "_chosen", {})


def block_bytes(model: LoadedModel) -> int:
    """What the blocks hold, as a worker counts it (block.weight_bytes: RoPE constants aside)."""
    return sum(t.nbytes for w in model.parts.blocks.values() for n, t in w.items() if not n.startswith("rope."))


def fp32_bytes(model: LoadedModel) -> int:
    return 4 * sum(block_params(model.parts.shape, b) for b in (b.kind for b in model.parts.blocks))


def worker_telemetry(cluster: LocalCluster, workers: list[str]) -> dict[str, worker_pb2.WorkerTelemetry]:
    out = {}
    for worker in workers:
        with grpc.insecure_channel(cluster.addresses[worker]) as channel:
            out[worker] = worker_pb2_grpc.WorkerStub(channel).GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10)
    return out


def run_and_compare(path: str, fmt: str, prompts: list[str], local: LoadedModel | None = None) -> None:
    """Generate on the cluster and in-process (on ``local``, by default ``load_model(path, fmt)``);
    tokens equal; the workers' bytes are the blocks'."""
    local = local or load_model(path, fmt, progress=False)
    generator = LocalGenerator(local)
    expected = [generator.generate(p, SamplingParams(max_new_tokens=NEW_TOKENS)).token_ids for p in prompts]
    with LocalCluster(path, workers=3, progress=False, dtype=fmt, extra_env={kernel_probe.ENV: PINS}) as cluster, \
            Client(cluster.address) as client:
        got = [client.generate_full(p, max_new_tokens=NEW_TOKENS).token_ids for p in prompts]
        status = client.status()
        deadline = time.monotonic() + 20
        while True:  # the finished sessions' caches are dropped on the workers shortly after
            telemetry = worker_telemetry(cluster, status["workers"])
            if all(t.sessions == 0 for t in telemetry.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    for prompt, want, have in zip(prompts, expected, got):
        assert len(want) == NEW_TOKENS, f"{prompt!r}: stopped early, compare fewer tokens: {want}"
        assert have == want, f"{fmt} {prompt!r}: cluster {have} != in-process {want}"
    assert len(status["workers"]) == 3 and len(set(status["placement"].values())) == 3, status["placement"]
    assert all(t.sessions == 0 for t in telemetry.values())
    used = sum(t.memory_used_bytes for t in telemetry.values())  # without sessions: the weights alone
    assert used == block_bytes(local), {w: t.memory_used_bytes for w, t in telemetry.items()}
    full = fp32_bytes(local)
    if fmt in ("bf16", "fp16"):
        assert used * 2 == full
    elif fmt == "int8":  # 1 byte a weight, fp16 scales per row, bf16 norms and biases
        assert used < full / 3.5
    else:  # q4: half a byte a weight, fp16 scale and min per 32 weights, bf16 norms and biases
        assert used < full / 5.5


@pytest.fixture(scope="module")
def tiny_paths(save_tiny_model):
    return {"gpt2": str(save_tiny_model(GPT2_Q4, "formats-cluster-gpt2", seed=4)),
            "llama-gqa": str(save_tiny_model(TINY_CONFIGS["llama-gqa"], "formats-cluster-llama", seed=4))}


def test_fp32_block_bytes_are_four_per_parameter(tiny_paths):
    """The yardstick the format checks compare against, checked once in-process."""
    for path in tiny_paths.values():
        model = load_model(path, "fp32", progress=False)
        assert block_bytes(model) == fp32_bytes(model)


@pytest.mark.parametrize("name,fmt", [("gpt2", "q4"), ("gpt2", "bf16"), ("llama-gqa", "int8"),
                                      ("llama-gqa", "fp16")])
def test_tiny_cluster_is_token_identical_to_in_process(tiny_paths, name, fmt):
    run_and_compare(tiny_paths[name], fmt, ["Edge devices", "Tell me a joke."])


def test_smollm2_q4_cluster_is_token_identical_to_in_process(smollm2_gguf):
    run_and_compare(str(smollm2_gguf), "q4", ["The history of the Roman Empire began"])


def test_smollm2_bf16_cluster_is_token_identical_to_in_process(smollm2_gguf, smollm2):
    """The in-process side as load_model(path, "bf16") builds it (transformers' fp32 model,
    sliced and converted), from the session's already loaded model: reading the GGUF
    through transformers costs ~20-50 s here, and the head node pays it once already."""
    local = from_transformers("smollm2-135m", *smollm2)
    local.parts, local.dtype = convert_parts(local.parts, "bf16", torch.bfloat16), "bf16"
    run_and_compare(str(smollm2_gguf), "bf16", ["The history of the Roman Empire began"], local)
