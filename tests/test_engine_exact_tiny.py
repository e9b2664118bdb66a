"""Random-initialized tiny models of every supported kind: the block engine's logits
match transformers after the prefill and after each of 50+ decode steps (fp32)."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.slicing import slice_checkpoint
from tiny_configs import TINY_CONFIGS

DECODE_STEPS = 52
PROMPT = [1, 104, 308, 314, 260, 229, 282, 49, 30, 2]  # includes id 2, which HF would treat as padding


def hf_step(model, ids, cache):
    """One transformers forward with an explicit cache (the keyword was renamed in 5.x)."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(torch.tensor([ids]), use_cache=True, **{key: cache}).logits[0, -1]


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]).eval()
    # random init gives near-uniform logits; sharpen them so that greedy tokens are meaningful
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model, BlockEngine(slice_checkpoint(model.config, dict(model.state_dict())))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers_prefill_and_decode(name):
    model, engine = build(name)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        ref = hf_step(model, PROMPT, cache)
        ours = engine.forward("s", PROMPT)
        torch.testing.assert_close(ours, ref, msg=lambda m: f"{name} after prefill: {m}")
        token = int(ref.argmax())
        for step in range(DECODE_STEPS):
            ref = hf_step(model, [token], cache)
            ours = engine.forward("s", [token])
            torch.testing.assert_close(ours, ref, msg=lambda m: f"{name} decode step {step}: {m}")
            token = int(ref.argmax())
    assert engine.lengths["s"] == len(PROMPT) + DECODE_STEPS


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_chunked_prefill_equals_one_prefill(name):
    """Feeding the prompt in two chunks (the masked path) gives the same logits."""
    _, engine = build(name)
    with torch.inference_mode():
        whole = engine.forward("a", PROMPT)
        engine.forward("b", PROMPT[:4])
        chunked = engine.forward("b", PROMPT[4:])
    torch.testing.assert_close(chunked, whole)


def test_sessions_are_independent():
    _, engine = build("llama-gqa")
    with torch.inference_mode():
        alone = [engine.forward("x", PROMPT)] + [engine.forward("x", [t]) for t in (5, 6, 7)]
        engine.drop_session("x")
        engine.forward("other", [9, 9, 9, 9])
        mixed = [engine.forward("y", PROMPT)]
        for t in (5, 6, 7):
            engine.forward("other", [t])
            mixed.append(engine.forward("y", [t]))
    for a, b in zip(alone, mixed):
        torch.testing.assert_close(a, b)
    engine.drop_session("y")
    assert all("y" not in block.caches for layer in engine.layers for block in layer.attention)
