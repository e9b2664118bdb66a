"""The Table-I formulas (protos/edgeheads/common/spec.py) against real parameter counts, real
K/V tensor sizes and FLOPs counted by torch's FlopCounterMode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.common import spec
from edgeheads.common.spec import BlockKind
from tiny_configs import TINY_CONFIGS

CONTEXT = 23


def engine_for(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]).eval()
    return model, BlockEngine(slice_checkpoint(model.config, dict(model.state_dict())))


def check_param_counts(model, engine: BlockEngine) -> None:
    shape = engine.shape
    by_formula = sum(spec.block_params(shape, b.kind) for b in shape.block_ids()) + spec.headnode_params(shape)
    # every attention block carries its own copy of the layer's pre-attention norm
    replicated_norms = shape.n_layers * (shape.n_kv_heads - 1) * shape.norm_params
    assert by_formula - replicated_norms == model.num_parameters()
    for block in engine.blocks():
        assert block.weight_bytes == spec.block_weight_bytes(shape, block.block_id.kind), str(block.block_id)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_param_counts_match_the_real_model(name):
    check_param_counts(*engine_for(name))


@pytest.mark.slow
def test_param_counts_match_smollm2(smollm2):
    from edgeheads.headnode.loading import from_transformers

    model, tokenizer = smollm2
    loaded = from_transformers("smollm2-135m", model, tokenizer)
    engine = BlockEngine(loaded.parts)
    check_param_counts(model, engine)
    # the named shape the controller plans with is the real model's shape
    # (the GGUF stores eps as float32, hence the replace)
    assert dataclasses.replace(loaded.parts.shape, norm_eps=1e-5) == spec.SMOLLM2_135M


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-mqa", "llama-odd-heads"])
def test_kv_bytes_per_token_match_cache_growth(name):
    _, engine = engine_for(name)
    with torch.inference_mode():
        engine.forward("s", list(range(1, CONTEXT)))
        engine.forward("s", [5])
    for layer in engine.layers:
        for block in layer.attention:
            cache = block.caches["s"]
            assert cache.length == CONTEXT
            assert cache.valid_bytes == CONTEXT * block.kv_bytes_per_token  # what a migration moves
            assert cache.nbytes == cache.capacity * block.kv_bytes_per_token >= cache.valid_bytes  # allocated
            assert cache.keys.shape[-1] * cache.keys.element_size() * 2 == block.kv_bytes_per_token
    assert layer.projection.kv_bytes_per_token == layer.ffn.kv_bytes_per_token == 0


def counted_decode_flops(block, shape, x: torch.Tensor) -> int:
    """Matmul FLOPs of one decode step, counted by torch (decode attention runs as explicit
    matmuls over the block's real cache, so the context term is counted too)."""
    with FlopCounterMode(display=False) as counter:
        if block.block_id.kind is BlockKind.ATTENTION:
            block.forward("s", x)
        elif block.block_id.kind is BlockKind.PROJECTION:
            block.forward(torch.randn(1, 1, shape.n_heads * shape.head_dim), x)
        else:
            block.forward(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-qkvo-bias", "llama-odd-heads"])
def test_decode_flops_formula_covers_counted_matmuls(name):
    """The formula is the counted matmul FLOPs plus elementwise work (norms, softmax,
    activations, RoPE), which is a few percent at most."""
    _, engine = engine_for(name)
    shape = engine.shape
    with torch.inference_mode():
        engine.forward("s", list(range(1, CONTEXT)))
        x = torch.randn(1, 1, shape.hidden_size)
        for block in (engine.layers[0].attention[0], engine.layers[0].projection, engine.layers[0].ffn):
            counted = counted_decode_flops(block, shape, x)
            formula = block.flops_decode(CONTEXT)
            assert counted <= formula <= 1.12 * counted, (str(block.block_id), counted, formula)


def test_prefill_flops_is_mean_over_causal_positions():
    shape = spec.SMOLLM2_135M
    T = 40
    mean_of_decodes = sum(spec.attention_flops_decode(shape, t) for t in range(1, T + 1)) / T
    assert spec.attention_flops_prefill(shape, T) == pytest.approx(mean_of_decodes)
    assert spec.block_flops_prefill(shape, BlockKind.FFN, T) == spec.ffn_flops(shape)


def test_block_id_round_trip_and_order():
    ids = spec.SMOLLM2_135M.block_ids()
    assert len(ids) == 30 * 5
    assert [spec.BlockId.parse(str(b)) for b in ids] == ids
    with pytest.raises(ValueError, match="not a block id"):
        spec.BlockId.parse("attn(3)")
