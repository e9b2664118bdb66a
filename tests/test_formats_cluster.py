"""Weight formats over real processes: a 3-worker LocalCluster whose head node runs with
``--dtype FMT`` generates the same greedy tokens as the in-process engine on
``load_model(path, FMT)``, and its workers report the bytes their blocks really hold (q4 a
fraction of fp32).

Every model in q4, int8, bf16 and fp16: SmolLM2 (q4 its GGUF read as stored; the others
converted from the GGUF's floats, saved once as a transformers directory, which a head node
reads in ~1 s instead of 20-35 s through transformers' GGUF reader), tiny gpt2 (64 wide, so
q4 groups fit) and tiny llama-gqa (grouped-query attention; 64 and 96 wide), both drawn so
that each format's tokens are its own. fp32 over a cluster against the in-process engine:
tests/test_cluster_runtime.py (SmolLM2, the 48-wide tiny gpt2) and tests/test_restarts.py
(llama-gqa); the engine's fp32 against transformers: tests/test_engine_exact*.py.

A cluster takes ~10-30 s to start on a shared 2-core machine, so each model gets one
(FormatClusters): the controller and workers stay up, and for each next format the head
node is stopped, the workers drop every block (holding nothing, as fresh ones) and a new
head node starts with the new ``--dtype`` (LocalCluster.restart_headnode, ~4 s). It
announces its model, the controller places it, and the head node ships the blocks in that
format as at a first start; only the worker processes are the previous format's.

Kernels are pinned to each format's preferred one (``EDGEHEADS_KERNELS``) in this process
and the cluster's: left to measurement, a loaded machine can time a kernel 100x off and two
processes then choose differently and round differently (worker/kernel_probe.py), which is
a property of the probe, not of the formats tested here.
"""

from __future__ import annotations

import shutil
import time

import grpc
import pytest
from transformers import GPT2Config

from edgeheads.common.spec import block_params
from edgeheads.headnode import Client
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import LoadedModel, load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.worker import kernel_probe, kernels
from test_kernels import GPT2_Q4
from tiny_configs import llama

pytestmark = pytest.mark.system

NEW_TOKENS = 16
TINY_PROMPTS = ["Edge devices", "Tell me a joke."]
# Weights drawn wider than transformers' default std of 0.02, under which the tiny gpt2 says
# one token over and over in every format: at 0.3 each format's greedy tokens are its own
# (test_the_tiny_models_tokens_tell_the_formats_apart), so a cluster computing in another
# format than the one asked for fails. llama-gqa: tiny_configs' llama-gqa (64 and 96 wide).
TINY = {"gpt2": GPT2Config.from_dict({**GPT2_Q4.to_dict(), "initializer_range": 0.3}),
        "llama-gqa": llama(initializer_range=0.3)}
FORMATS = ["q4", "int8", "bf16", "fp16"]
PINS = ",".join(f"{fmt}={order[0]}" for fmt, order in kernels.PREFERENCE.items())
WORKERS = 3


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


class FormatClusters:
    """One LocalCluster at a time, for one model, its head node serving the file and format
    asked for: started with them, or, for the model it already serves, with its head node
    stopped, the workers emptied and a new head node started with them."""

    def __init__(self) -> None:
        self.cluster: LocalCluster | None = None
        self.name: str | None = None

    def serving(self, name: str, path: str, fmt: str, blocks: list[str]) -> LocalCluster:
        if self.cluster is not None and self.name != name:
            self.close()
        if self.cluster is None:
            self.cluster = LocalCluster(path, workers=WORKERS, progress=False, dtype=fmt,
                                        extra_env={kernel_probe.ENV: PINS})
            self.name = name
            self.cluster.start()
        elif (self.cluster.model, self.cluster.dtype) != (path, fmt):
            cluster = self.cluster
            head = cluster.procs["headnode"]
            head.terminate()
            head.wait(timeout=30)
            workers = [n for n in cluster.procs if n.startswith("worker-")]
            for worker in workers:  # every block of the model, whichever worker the last placement gave it
                with grpc.insecure_channel(cluster.addresses[worker]) as channel:
                    worker_pb2_grpc.WorkerStub(channel).UnloadBlocks(
                        worker_pb2.UnloadBlocksRequest(block_ids=blocks), timeout=30)
            emptied = worker_telemetry(cluster, workers)
            assert all(t.memory_used_bytes == 0 for t in emptied.values()), emptied
            cluster.restart_headnode(fmt, model=path)
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        self.cluster = self.name = None


@pytest.fixture(scope="module")
def clusters():
    pool = FormatClusters()
    yield pool
    pool.close()


def run_and_compare(clusters: FormatClusters, name: str, path: str, fmt: str, prompts: list[str]) -> None:
    """Generate on model ``name``'s cluster serving ``path`` in ``fmt`` and in-process on
    ``load_model(path, fmt)``; tokens equal; the workers' bytes are the blocks'."""
    local = load_model(path, fmt, progress=False)
    generator = LocalGenerator(local)
    expected = [generator.generate(p, SamplingParams(max_new_tokens=NEW_TOKENS)).token_ids for p in prompts]
    cluster = clusters.serving(name, path, fmt, [str(b) for b in local.parts.blocks])
    with Client(cluster.address) as client:
        got = [client.generate_full(p, max_new_tokens=NEW_TOKENS).token_ids for p in prompts]
        status = client.status()
    deadline = time.monotonic() + 20
    while True:  # the finished sessions' caches are dropped on the workers shortly after
        telemetry = worker_telemetry(cluster, status["workers"])
        if all(t.sessions == 0 for t in telemetry.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    command = cluster.procs["headnode"].args  # of the head node that answered
    for prompt, want, have in zip(prompts, expected, got):
        assert len(want) == NEW_TOKENS, f"{prompt!r}: stopped early, compare fewer tokens: {want}"
        assert have == want, f"{fmt} {prompt!r}: cluster {have} != in-process {want}"
    assert command[command.index("--dtype") + 1] == fmt and command[command.index("--model") + 1] == path, command
    assert len(status["workers"]) == WORKERS and len(set(status["placement"].values())) == WORKERS, status
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
    return {name: str(save_tiny_model(config, f"formats-cluster-{name}", seed=4)) for name, config in TINY.items()}


def test_fp32_block_bytes_are_four_per_parameter(tiny_paths):
    """The yardstick the format checks compare against, checked once in-process."""
    for path in tiny_paths.values():
        model = load_model(path, "fp32", progress=False)
        assert block_bytes(model) == fp32_bytes(model)


def test_the_tiny_models_tokens_tell_the_formats_apart(tiny_paths):
    """In-process: no two formats give the same greedy tokens, so the cluster tests below see
    a wrong format, not only a wrong computation."""
    for name, path in tiny_paths.items():
        tokens = {fmt: [LocalGenerator(load_model(path, fmt, progress=False)).generate(
            p, SamplingParams(max_new_tokens=NEW_TOKENS)).token_ids for p in TINY_PROMPTS] for fmt in FORMATS}
        alike = [(a, b) for i, a in enumerate(FORMATS) for b in FORMATS[i + 1:] if tokens[a] == tokens[b]]
        assert not alike, f"{name}: {alike} generate the same tokens; pick another seed or init"


@pytest.fixture(scope="module")
def smollm2_floats(smollm2, tmp_path_factory):
    """SmolLM2's floats as transformers reads them from the GGUF, saved as a transformers
    directory: the head node reads it in ~1 s, the GGUF through transformers in 20-35 s here
    (each format's head node would pay that). Sliced, its blocks are the same bits as the
    GGUF's through transformers (checked by hand when this was written); either way the
    cluster and the in-process engine read the same directory."""
    from safetensors.torch import save_model
    from transformers import AutoConfig

    model, tokenizer = smollm2
    out = tmp_path_factory.mktemp("formats-cluster-smollm2")
    save_model(model, str(out / "model.safetensors"))  # the tied embedding once
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "_model_name_or_path")}
    AutoConfig.for_model(**config).save_pretrained(out)  # plain floats now, no GGUF quantization
    tokenizer.save_pretrained(out)
    yield str(out)
    shutil.rmtree(out, ignore_errors=True)  # 0.5 GB


@pytest.mark.parametrize("name,fmt", [(name, fmt) for name in ("gpt2", "llama-gqa") for fmt in FORMATS])
def test_tiny_cluster_is_token_identical_to_in_process(tiny_paths, clusters, name, fmt):
    run_and_compare(clusters, name, tiny_paths[name], fmt, TINY_PROMPTS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_smollm2_cluster_is_token_identical_to_in_process(smollm2_gguf, smollm2_floats, clusters, fmt):
    """q4 from the GGUF, its blocks read as stored; the others converted from its floats."""
    path = str(smollm2_gguf) if fmt == "q4" else smollm2_floats
    run_and_compare(clusters, "smollm2", path, fmt, ["The history of the Roman Empire began"])
