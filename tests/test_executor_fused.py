"""The layer executor on a worker: co-hosted KV groups of one layer, received as separate
blobs, are re-packed into one buffer and run as one fused q/k/v matmul with one shared
cache store; the result equals each group run alone, memory is counted as allocated, and
one block still migrates out of the fused set on its own."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeheads.common.wire import sha256_hex, weights_to_blob
from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.worker.blocks.kv_cache import KVCache
from edgeheads.worker.host import BlockHost, OpSpec
from edgeheads.worker.migration import cache_lengths, export_state, import_state
from tiny_configs import TINY_CONFIGS

GROUPS = ["attn(1,0)", "attn(1,1)"]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


def digest(parts, block: str) -> str:
    return sha256_hex(weights_to_blob(next(w for b, w in parts.blocks.items() if str(b) == block)))


def host_with(parts, name: str, blocks: list[str]) -> BlockHost:
    host = BlockHost(name)
    for block_id, weights in parts.blocks.items():
        if str(block_id) in blocks:
            blob = weights_to_blob({k: v.clone() for k, v in weights.items()})  # arrives on its own
            host.add_weights(blob, sha256_hex(blob))
            host.bind_block(str(block_id), json.dumps(parts.shape.to_dict()), sha256_hex(blob))
    return host


def step(host: BlockHost, session: str, position: int, x: torch.Tensor, blocks: list[str]) -> list[torch.Tensor]:
    ops = [OpSpec(b, ["x"], f"out{i}") for i, b in enumerate(blocks)]
    out = host.run_call(session, position, {"x": x}, ops, [op.output for op in ops])
    return [out[op.output] for op in ops]


def block(host: BlockHost, text: str):
    return next(b for i, b in host.blocks.items() if str(i) == text)


def test_cohosted_groups_share_one_buffer_and_run_as_one_matmul(parts):
    host = host_with(parts, "w", GROUPS)
    a, b = (block(host, g).weights["qkv.weight"] for g in GROUPS)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one buffer
    assert b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()  # adjacent rows
    compiled = host.compile_call([OpSpec(g, ["x"], f"out{i}") for i, g in enumerate(GROUPS)], ["x"],
                               ["out0", "out1"])
    assert len(compiled.units) == 1 and len(compiled.units[0].group.blocks) == 2
    calls = []
    original = torch.nn.functional.linear
    torch.nn.functional.linear = lambda *args: calls.append(args[1].shape) or original(*args)
    try:
        step(host, "s", 0, torch.randn(1, 5, parts.shape.hidden_size), GROUPS)
    finally:
        torch.nn.functional.linear = original
    rows = (parts.shape.heads_per_group + 2) * parts.shape.head_dim
    assert calls == [(2 * rows, parts.shape.hidden_size)]  # one q/k/v matmul for both groups
    # the hashes the head node expects still hold for each block
    for g in GROUPS:
        assert sha256_hex(weights_to_blob(block(host, g).weights)) == digest(parts, g)


def test_fused_equals_each_group_alone(parts):
    fused = host_with(parts, "fused", GROUPS)
    alone = [host_with(parts, f"alone{i}", [g]) for i, g in enumerate(GROUPS)]
    torch.manual_seed(1)
    hidden = parts.shape.hidden_size
    position = 0
    for n in (6, 1, 1, 3, 1):  # prefill, decode, a chunk, decode
        x = torch.randn(1, n, hidden)
        together = step(fused, "s", position, x, GROUPS)
        separate = [step(h, "s", position, x, [g])[0] for h, g in zip(alone, GROUPS)]
        for got, want in zip(together, separate):
            torch.testing.assert_close(got, want)
        position += n
    caches = [block(fused, g).caches["s"] for g in GROUPS]
    assert caches[0].store is caches[1].store and [c.slot for c in caches] == [0, 1]


def test_memory_counts_allocated_cache_bytes(parts):
    host = host_with(parts, "w", GROUPS)
    weights = host.memory_used_bytes()
    step(host, "s", 0, torch.randn(1, 5, parts.shape.hidden_size), GROUPS)
    store = block(host, GROUPS[0]).caches["s"].store  # (2, G, capacity, d)
    assert store.shape[:2] == (2, 2) and store.shape[2] > 5
    assert host.memory_used_bytes() == weights + store.numel() * store.element_size()
    per_token = 2 * parts.shape.head_dim * 4
    assert host.cache_valid_bytes() == 2 * 5 * per_token  # two groups, 5 rows each
    cache = block(host, GROUPS[0]).caches["s"]
    assert cache.nbytes == cache.capacity * per_token and cache.valid_bytes == 5 * per_token


def test_preallocated_cache_does_not_move_while_decoding():
    cache = KVCache(4, torch.float32, capacity=8)
    cache.reserve(40)  # one allocation for the whole generation
    ptr = cache.keys.data_ptr()
    for _ in range(40):
        cache.append(torch.randn(1, 4), torch.randn(1, 4))
    assert cache.keys.data_ptr() == ptr and cache.capacity == 40
    cache.append(torch.randn(1, 4), torch.randn(1, 4))  # past the reservation: grows by doubling
    assert cache.capacity == 80 and cache.length == 41


def test_engine_reserves_for_the_whole_generation(parts):
    engine = BlockEngine(parts)
    with torch.inference_mode():
        engine.forward("s", [1, 2, 3], reserve_tokens=100)
        store = engine.layers[0].attention[0].caches["s"].store
        for token in range(20):
            engine.forward("s", [token])
    assert engine.layers[0].attention[0].caches["s"].store is store and store.shape[2] == 100
    first, second = (b.weights["qkv.weight"] for b in engine.layers[0].attention)
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    assert len(engine.layers[0].groups) == 1


def test_one_block_migrates_out_of_a_fused_set(parts):
    shape_json = json.dumps(parts.shape.to_dict())
    src, dst = host_with(parts, "src", GROUPS), BlockHost("dst")
    hidden = parts.shape.hidden_size
    torch.manual_seed(2)
    xs = [torch.randn(1, 4, hidden), torch.randn(1, 1, hidden)]
    step(src, "s", 0, xs[0], GROUPS)
    moving = GROUPS[1]
    import_state(dst, export_state(src, moving, True, {}), moving, shape_json, digest(parts, moving))
    step(src, "s", 4, xs[1], GROUPS)  # decoding goes on at the source
    import_state(dst, export_state(src, moving, False, cache_lengths(dst, moving)), moving, shape_json,
                 digest(parts, moving))
    assert cache_lengths(dst, moving) == cache_lengths(src, moving) == {"s": 5}
    x5 = torch.randn(1, 1, hidden)
    want = step(src, "s", 5, x5, GROUPS)
    torch.testing.assert_close(step(dst, "s", 5, x5, [moving])[0], want[1])
    # the source frees the moved block; the group left behind is re-packed and keeps its cache
    src.unload([moving])
    kept = block(src, GROUPS[0]).weights["qkv.weight"]
    assert kept.untyped_storage().nbytes() == kept.nbytes  # the moved block's rows are freed
    reference = host_with(parts, "ref", [GROUPS[0]])
    for position, inp in ((0, xs[0]), (4, xs[1]), (5, x5)):  # the same history, run alone
        step(reference, "r", position, inp, [GROUPS[0]])
    x6 = torch.randn(1, 1, hidden)
    torch.testing.assert_close(step(src, "s", 6, x6, [GROUPS[0]])[0], step(reference, "r", 6, x6, [GROUPS[0]])[0])
