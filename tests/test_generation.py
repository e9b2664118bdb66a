"""The generation loop: EOS, length, streaming, prompt encoding."""

from __future__ import annotations

import pytest
import torch

from edgeheads.headnode.generation import encode_prompt, generate, generate_stream
from edgeheads.headnode.sampling import SamplingParams

VOCAB = 50


class ScriptedModel:
    """A step function that emits a fixed sequence of tokens, recording its calls."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.calls: list[tuple[str, list[int]]] = []

    def __call__(self, session: str, ids: list[int]) -> torch.Tensor:
        self.calls.append((session, list(ids)))
        logits = torch.zeros(VOCAB)
        logits[self.script[len(self.calls) - 1]] = 10.0
        return logits


class FakeTokenizer:
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stops_on_eos_and_excludes_it():
    model = ScriptedModel([3, 4, 2, 5])
    result = generate(model, FakeTokenizer(), [7, 8], SamplingParams(max_new_tokens=10), eos_token_ids=[2])
    assert result.token_ids == [3, 4]
    assert result.finish_reason == "eos"
    assert model.calls[0][1] == [7, 8] and [c[1] for c in model.calls[1:]] == [[3], [4]]


def test_max_new_tokens_and_no_wasted_step():
    model = ScriptedModel([3, 4, 5, 6])
    result = generate(model, FakeTokenizer(), [1], SamplingParams(max_new_tokens=3), eos_token_ids=[2])
    assert result.token_ids == [3, 4, 5] and result.finish_reason == "length"
    assert len(model.calls) == 3  # prefill + 2 decodes: the last token needs no forward pass


def test_stream_text_concatenates_to_the_final_text_and_session_is_dropped():
    dropped, results = [], []
    model = ScriptedModel([3, 4, 5])
    events = list(generate_stream(model, FakeTokenizer(), [1], SamplingParams(max_new_tokens=3), [2],
                                  on_finish=results.append, drop_session=dropped.append))
    assert "".join(e.text for e in events) == results[0].text == "def"
    assert dropped == [model.calls[0][0]]


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        generate(ScriptedModel([1]), FakeTokenizer(), [], SamplingParams(), [2])


def test_chat_template_applied_by_default_when_present(smol_tokenizer):
    chat = encode_prompt(smol_tokenizer, "Hello", chat=None)
    raw = encode_prompt(smol_tokenizer, "Hello", chat=False)
    assert smol_tokenizer.decode(chat).count("<|im_start|>") >= 2 and "<|im_start|>" not in smol_tokenizer.decode(raw)
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(FakeTokenizer(), "Hello", chat=True)
