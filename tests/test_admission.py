"""Admission arithmetic and the worker's guard, without processes: the ledger
(headnode/admission.py) reserves what fits and names what does not; a worker allocates a
session's caches for exactly its reservation, which is what the ledger counts; and a worker
refuses with RESOURCE_EXHAUSTED, changing nothing, an allocation past its memory budget."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeheads.common.spec import BlockId, BlockKind
from edgeheads.common.wire import sha256_hex, weights_to_blob
from edgeheads.controller.spread import WorkerCapacity, spread
from edgeheads.headnode.admission import (AdmissionError, Ledger, ModelCost, SessionLimitError, WorkerBudget,
                                          shortfalls)
from edgeheads.headnode.admission_control import block_weight_bytes, cache_row_bytes
from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.worker.blocks.kv_cache import DEFAULT_CAPACITY, store_capacity
from edgeheads.worker.host import BlockHost, HostError, OpSpec
from edgeheads.worker.migration import export_state, import_state
from tiny_configs import TINY_CONFIGS

MiB = 1 << 20


# ---------------------------------------------------------------------------- the ledger
def cost_of_two_workers() -> ModelCost:
    """w0: 2 attention blocks and 3 MiB of weights; w1: 1 attention block, 1 MiB; 1 KiB a row."""
    a = [BlockId.parse("attn(0,0)"), BlockId.parse("attn(0,1)"), BlockId.parse("attn(1,0)")]
    ffn = BlockId.parse("ffn(0)")
    placement = {a[0]: "w0", a[1]: "w0", ffn: "w0", a[2]: "w1"}
    weights = {a[0]: MiB, a[1]: MiB, ffn: MiB, a[2]: MiB}
    return ModelCost.of(placement, weights, 1024)


def test_cost_counts_attention_blocks_and_weights_per_worker():
    cost = cost_of_two_workers()
    assert cost.attention == {"w0": 2, "w1": 1} and cost.weights == {"w0": 3 * MiB, "w1": MiB}
    assert cost.kv_bytes(100) == {"w0": 200 * 1024, "w1": 100 * 1024}
    budgets = {"w0": WorkerBudget(4 * MiB, 3 * MiB), "w1": WorkerBudget(4 * MiB, MiB)}
    assert cost.room(budgets, 0) == {"w0": MiB, "w1": 3 * MiB}
    assert cost.room(budgets, 256) == {"w0": MiB - 512 * 1024, "w1": 3 * MiB - 256 * 1024}
    # a worker reporting more in use than the ledger knows of (orphaned caches) has less room
    assert cost.room({"w0": WorkerBudget(4 * MiB, 3 * MiB + 1000)}, 0) == {"w0": MiB - 1000}
    assert cost.tokens_that_fit(cost.room(budgets, 0)) == 512  # w0: 1 MiB over 2 blocks of 1 KiB a row
    assert shortfalls({"w0": 10, "w1": 10, "w2": 10**9}, {"w0": 10, "w1": 9}) == [
        next(iter(shortfalls({"w1": 10}, {"w1": 9})))]  # w2 has no known budget: not checked


def test_ledger_admits_what_fits_next_to_the_others_and_releases():
    cost = cost_of_two_workers()
    budgets = {"w0": WorkerBudget(4 * MiB, 3 * MiB), "w1": WorkerBudget(4 * MiB, MiB)}
    ledger = Ledger(max_sessions=10)
    assert ledger.admit("a", 100, 200, cost, budgets) == 300
    assert ledger.admit("b", 12, 200, cost, budgets) == 212  # 512 tokens on w0: full
    with pytest.raises(AdmissionError) as refused:
        ledger.admit("c", 1, 0, cost, budgets)
    assert refused.value.code == "RESOURCE_EXHAUSTED" and "c" not in ledger
    message = str(refused.value)
    assert "1 tokens (prompt 1 + max_new_tokens 0)" in message
    assert ("0.00 MiB on w0 (2 attention blocks), which has 0.00 MiB free (budget 4.00 MiB: weights 3.00 MiB, "
            "3.00 MiB in use)") in message
    assert "2 running sessions hold 512 tokens" in message and "at most 0 tokens fit now, 512 with no other" in message
    assert ledger.release("a") == 300 and ledger.release("a") == 0  # idempotent
    assert ledger.admit("c", 100, 200, cost, budgets) == 300
    assert list(ledger.tokens) == ["b", "c"] and ledger.reserved_tokens == 512


def test_a_request_that_never_fits_says_so():
    cost = cost_of_two_workers()
    budgets = {"w0": WorkerBudget(4 * MiB, 3 * MiB), "w1": WorkerBudget(4 * MiB, MiB)}
    with pytest.raises(AdmissionError, match="no other session is running; at most 512 tokens fit"):
        Ledger().admit("huge", 10, 10**6, cost, budgets)


def test_session_limit_comes_first_and_frees_with_a_release():
    cost = cost_of_two_workers()
    budgets = {"w0": WorkerBudget(1 << 40, 0), "w1": WorkerBudget(1 << 40, 0)}
    ledger = Ledger(max_sessions=2)
    ledger.admit("a", 1, 1, cost, budgets)
    ledger.admit("b", 1, 1, cost, budgets)
    with pytest.raises(SessionLimitError, match="2 sessions are running.*headnode.max_sessions") as refused:
        ledger.admit("c", 1, 1, cost, budgets)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    ledger.release("b")
    ledger.admit("c", 1, 1, cost, budgets)
    assert Ledger(None).max_sessions is None


def test_after_a_loss_the_newest_sessions_that_no_longer_fit_go_first():
    ledger = Ledger()
    roomy = cost_of_two_workers()
    budgets = {"w0": WorkerBudget(5 * MiB, 0), "w1": WorkerBudget(5 * MiB, 0)}
    for name, tokens in [("old", 200), ("mid", 200), ("new", 100)]:
        ledger.admit(name, tokens, 0, roomy, budgets)
    # everything on w0 now: 3 attention blocks, 4 MiB of weights, room for 1 MiB / 3 KiB = 341 tokens
    a = [BlockId.parse("attn(0,0)"), BlockId.parse("attn(0,1)"), BlockId.parse("attn(1,0)")]
    ffn = BlockId.parse("ffn(0)")
    squeezed = ModelCost.of({b: "w0" for b in [*a, ffn]}, dict.fromkeys([*a, ffn], MiB), 1024)
    survivors = {"w0": WorkerBudget(5 * MiB, 4 * MiB + 123456)}  # what it holds now is rebuilt: not counted
    assert ledger.over(squeezed, survivors) == ["mid"]  # old (200) stays; new (100) still fits next to it
    assert ledger.placement_shortfalls(squeezed, survivors)[0].worker == "w0"
    assert ledger.placement_shortfalls(roomy, budgets) == []


# ---------------------------------------------------------------------------- workers
@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


def host_with(parts, blocks: list[BlockId], limit: int | None = None) -> BlockHost:
    host = BlockHost("w", limit)
    for block_id in blocks:
        blob = weights_to_blob({k: v.clone() for k, v in parts.blocks[block_id].items()})
        host.add_weights(blob, sha256_hex(blob))
        host.bind_block(str(block_id), json.dumps(parts.shape.to_dict()), sha256_hex(blob))
    return host


def attention_call(host: BlockHost, parts, layer: int, session: str, position: int, tokens: int,
                   reserve: int) -> None:
    blocks = [b for b in host.blocks if b.kind is BlockKind.ATTENTION and b.layer == layer]
    ops = [OpSpec(str(b), ["x"], f"out{i}") for i, b in enumerate(blocks)]
    host.run_call(session, position, {"x": torch.randn(1, tokens, parts.shape.hidden_size)}, ops,
                  [op.output for op in ops], reserve)


def test_store_capacity_is_the_reservation_when_it_covers_the_need():
    assert store_capacity(5, 300) == 300 and store_capacity(300, 300) == 300
    assert store_capacity(5) == DEFAULT_CAPACITY and store_capacity(100) == 100
    assert store_capacity(301, 300, 300) == 600  # past the reservation: doubling
    assert store_capacity(10, 0, 64) == 64


def test_a_worker_allocates_exactly_what_the_ledger_reserves(parts):
    attention = sorted(b for b in parts.blocks if b.kind is BlockKind.ATTENTION and b.layer < 2)
    host = host_with(parts, attention)
    placement = {b: "w" for b in attention}
    cost = ModelCost.of(placement, block_weight_bytes(parts), cache_row_bytes(parts))
    assert host.memory_used_bytes() == cost.weights["w"]  # the head node counts weights as the worker does
    before = host.memory_used_bytes()
    for layer in (0, 1):
        attention_call(host, parts, layer, "s", 0, 7, 300)  # the prefill allocates ...
    assert host.memory_used_bytes() - before == cost.kv_bytes(300)["w"]
    for position in range(7, 300):  # ... and decoding to the end of the reservation allocates nothing more
        for layer in (0, 1):
            attention_call(host, parts, layer, "s", position, 1, 300)
    assert host.memory_used_bytes() - before == cost.kv_bytes(300)["w"]


def test_a_worker_refuses_an_allocation_past_its_budget_and_changes_nothing(parts):
    attention = sorted(b for b in parts.blocks if b.kind is BlockKind.ATTENTION and b.layer == 0)
    weights = host_with(parts, attention).memory_used_bytes()
    row = cache_row_bytes(parts) * len(attention)
    host = host_with(parts, attention, limit=weights + 100 * row)
    attention_call(host, parts, 0, "fits", 0, 3, 100)
    with pytest.raises(HostError) as refused:
        attention_call(host, parts, 0, "more", 0, 3, 1)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert "worker w: the K/V caches of session 'more' need" in str(refused.value)
    assert host.sessions() == {"fits"} and host.memory_used_bytes() == weights + 100 * row
    with pytest.raises(HostError, match="RESOURCE|budget"):  # an absurd reservation allocates nothing
        attention_call(host_with(parts, attention), parts, 0, "absurd", 0, 1, 1 << 50)
    # growing past a reservation is guarded too
    for position in range(3, 100):
        attention_call(host, parts, 0, "fits", position, 1, 100)
    with pytest.raises(HostError) as refused:
        attention_call(host, parts, 0, "fits", 100, 1, 100)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert host.blocks[attention[0]].caches["fits"].length == 100  # the refused step left the cache as it was


def test_a_migrated_cache_keeps_its_reservation(parts):
    block = BlockId.parse("attn(0,0)")
    source = host_with(parts, [block])
    attention_call(source, parts, 0, "s", 0, 9, 250)
    payload = export_state(source, str(block), False, {})
    destination = host_with(parts, [block])
    before = destination.memory_used_bytes()
    content_hash = sha256_hex(weights_to_blob(parts.blocks[block]))
    import_state(destination, payload, str(block), json.dumps(parts.shape.to_dict()), content_hash)
    cache = destination.blocks[block].caches["s"]
    assert (cache.length, cache.capacity) == (9, 250)
    assert destination.memory_used_bytes() - before == 250 * cache_row_bytes(parts)
    tight = host_with(parts, [block], limit=before + 100 * cache_row_bytes(parts))
    with pytest.raises(HostError) as refused:
        import_state(tight, payload, str(block), json.dumps(parts.shape.to_dict()), content_hash)
    assert refused.value.code == "RESOURCE_EXHAUSTED" and tight.sessions() == set()


def test_the_spread_placement_of_the_tiny_model_costs_what_its_blocks_weigh(parts):
    placement = spread(parts.shape, [WorkerCapacity(w, 1 << 40) for w in ("a", "b", "c")], 256)
    cost = ModelCost.of(placement, block_weight_bytes(parts), cache_row_bytes(parts))
    assert sum(cost.weights.values()) == sum(block_weight_bytes(parts).values())
    assert sum(cost.attention.values()) == parts.shape.n_layers * parts.shape.n_kv_heads
    assert cache_row_bytes(parts) == 2 * parts.shape.head_dim * 4  # fp32


def test_a_repack_that_frees_memory_runs_on_a_worker_over_its_budget(parts):
    pair = [BlockId.parse("attn(0,0)"), BlockId.parse("attn(0,1)")]
    host = host_with(parts, pair)
    attention_call(host, parts, 0, "s", 0, 4, 100)  # one store for both blocks' caches: 2 x 100 rows
    host.unload([str(pair[1])])  # a migration took one block away; its half of the store stays allocated
    before = host.memory_used_bytes()
    host.memory_limit_bytes = before // 2  # and the worker's limit was lowered below what it holds
    attention_call(host, parts, 0, "s", 4, 1, 100)  # re-packs the remaining cache alone: frees more than it takes
    assert host.memory_used_bytes() == before - 100 * cache_row_bytes(parts)
    assert host.blocks[pair[0]].caches["s"].length == 5
