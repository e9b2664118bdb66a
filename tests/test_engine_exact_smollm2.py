"""SmolLM2-135M-Instruct with its real weights: greedy output token-identical to
transformers' generate for 64+ new tokens, on 3 prompts, one through the chat template."""

from __future__ import annotations

import pytest
import torch

from edgeheads.headnode.loading import from_transformers
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams

NEW_TOKENS = 64
PROMPTS = [
    ("The history of the Roman Empire began", False),
    ("def fibonacci(n):", False),
    ("Explain how a Raspberry Pi cluster can run a language model.", True),
]


@pytest.fixture(scope="module")
def generator(smollm2):
    model, tokenizer = smollm2
    return LocalGenerator(from_transformers("smollm2-135m", model, tokenizer))


@pytest.mark.slow
@pytest.mark.parametrize("prompt,chat", PROMPTS)
def test_greedy_tokens_identical_to_transformers(smollm2, generator, prompt, chat):
    model, _ = smollm2
    ids = generator.encode(prompt, chat=chat)
    # with chat the template is applied, without it the prompt is encoded as it is
    assert (ids != generator.encode(prompt, chat=False)) == chat, "chat template applied wrongly"
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    result = generator.generate_ids(ids, SamplingParams(max_new_tokens=NEW_TOKENS, stop_on_eos=False))
    assert len(expected) == NEW_TOKENS
    assert result.token_ids == expected
    assert result.finish_reason == "length"
