"""A model larger than any one worker (benchmarks/big_model.py at a CI scale): a random llama
of 0.15B parameters written straight as a Q4_0 GGUF (benchmarks/random_gguf.py) runs on 3
workers whose memory limits are each below the model's size, below half the layers' weights,
as low as the placement allows; its tokens are those of the same file run in-process as q4,
and no worker accounts more than its limit at any time we look. Limits that together cannot
hold the layers make the cluster refuse to start, with the placement's shortfall in the
error, and no daemon crashes.

What a worker accounts (and its limit bounds) is its block weights and caches; its resident
memory also holds the runtime and the int4 kernel's repacked copy of the weights, which
benchmarks/big_model.py reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import big_model as bench  # noqa: E402
from random_gguf import RandomLlama, nbytes, write_random_gguf  # noqa: E402

pytestmark = pytest.mark.system

# 151M parameters (75M in the layers, 75M in the embedding and the untied output), 85 MB
SPEC = RandomLlama(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, context=512, seed=3)
PROMPT = "Tell me about the sea."
NEW_TOKENS = 8
WORKERS = 3


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return write_random_gguf(SPEC, tmp_path_factory.mktemp("big-model") / "random-llama.gguf", progress=False)


@pytest.fixture(scope="module")
def local(model_file) -> bench.InProcess:
    return bench.run_in_process(model_file, PROMPT, NEW_TOKENS, progress=False)


def test_the_file_is_the_model_asked_for(model_file, local):
    shape = local.shape
    assert (shape.n_layers, shape.hidden_size, shape.n_heads, shape.n_kv_heads, shape.intermediate_size,
            shape.max_positions, shape.tie_embeddings) == (12, 768, 12, 4, 2048, 512, False)
    assert shape.vocab_size == 49152 and shape.dtype == "bf16"
    assert 0.14e9 < SPEC.params(shape.vocab_size) < 0.16e9
    data = sum(nbytes(shape_, kind) for _, shape_, kind in SPEC.tensors(shape.vocab_size))
    assert data == pytest.approx(SPEC.params(shape.vocab_size) * 18 / 32, rel=0.01)  # Q4_0: 18 bytes per 32
    assert 0 < model_file.stat().st_size - data < 4e6  # the rest: metadata, SmolLM2's vocabulary and merges
    assert len(local.tokens) == NEW_TOKENS and len(set(local.tokens)) > 1  # a run of one token would prove little


def test_a_model_larger_than_any_worker_runs_on_three_and_matches_in_process(model_file, local):
    size = model_file.stat().st_size
    # as tight as the placement allows: the least each of 3 workers must have for the controller
    # to place every block with a cache of the model's 512 positions (about 0.2 x the file)
    limit = bench.smallest_feasible_limit(local.shape, WORKERS)
    assert limit < local.layer_weight_bytes / 2 < size  # no worker could hold even half the layers

    run = bench.run_cluster(model_file, PROMPT, NEW_TOKENS, limit, WORKERS, progress=False)
    figures = "\n".join(map(str, run.workers))
    print(figures)
    assert run.tokens == local.tokens
    assert [(w.limit, w.limit_source) for w in run.workers] == [(limit, "config")] * WORKERS, figures
    for w in run.workers:
        assert w.blocks > 0, figures
        assert 0 < w.used_end <= w.used_peak <= w.limit, figures
    # every layer's weights are held once, spread over the three
    assert sum(w.used_end for w in run.workers) >= local.layer_weight_bytes, figures


def test_limits_that_together_cannot_hold_the_model_are_refused(model_file, local):
    limit = int(local.layer_weight_bytes / WORKERS * 0.9)
    error, logs = bench.refusal(model_file, limit, WORKERS)
    assert error.startswith("headnode exited with status 1 while starting"), error or "the cluster started"
    assert "controller found no placement" in error and "bytes" in error, error
    for name, log in logs.items():
        assert "Traceback" not in log, f"{name}:\n{log}"
    assert "Traceback" not in error, error  # the head node says it in one line and exits 1
