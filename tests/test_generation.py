"""The generation loop: EOS, length, streaming (sync and the server's async path), incremental
detokenization, prompt encoding. Tokenizers here are the tiny one built in tests/ (no download)
or a fake one; nothing loads the real model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from edgeheads.headnode.generation import (
    IncrementalDecoder,
    agenerate_stream,
    encode_prompt,
    generate,
    generate_stream,
)
from edgeheads.headnode.sampling import SamplingParams
from tiny_configs import VOCAB

FAKE_VOCAB = 50
MIXED_TEXT = "Hello 🙂 東京 café, naïve über — and <|im_end|> in the middle?"


class ScriptedModel:
    """A step function that emits a fixed sequence of tokens, recording its calls."""

    def __init__(self, script: list[int], vocab: int = FAKE_VOCAB) -> None:
        self.script = script
        self.vocab = vocab
        self.calls: list[tuple[str, list[int]]] = []

    def __call__(self, session: str, ids: list[int]) -> torch.Tensor:
        self.calls.append((session, list(ids)))
        logits = torch.zeros(self.vocab)
        logits[self.script[len(self.calls) - 1]] = 10.0
        return logits


class AsyncScriptedModel(ScriptedModel):
    """The same script as a coroutine step, as the cluster's step is; yields to the loop each call."""

    async def __call__(self, session: str, ids: list[int]) -> torch.Tensor:  # type: ignore[override]
        await asyncio.sleep(0)
        return super().__call__(session, ids)


class FakeTokenizer:
    """A slow (non-``tokenizers``) tokenizer: one letter per id."""

    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def collect_async(step, tokenizer, prompt, params, eos, session="s-1"):
    results = []

    async def run():
        return [e async for e in agenerate_stream(step, tokenizer, prompt, params, eos, session,
                                                  on_finish=results.append)]
    events = asyncio.run(run())
    return events, results


# ---------------------------------------------------------------- the sync loop

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


def test_chat_template_applied_by_default_when_present(tiny_tokenizer):
    chat = encode_prompt(tiny_tokenizer, "Hello", chat=None)
    raw = encode_prompt(tiny_tokenizer, "Hello", chat=False)
    assert tiny_tokenizer.decode(chat).count("<|im_start|>") == 2
    assert "<|im_start|>" not in tiny_tokenizer.decode(raw)
    assert encode_prompt(tiny_tokenizer, "Hello", chat=True) == chat
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(FakeTokenizer(), "Hello", chat=True)


# ---------------------------------------------------------------- incremental detokenization

def stream_pieces(tokenizer, ids: list[int]) -> tuple[list[str], IncrementalDecoder]:
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.push(i) for i in ids], decoder


def test_tiny_tokenizer_splits_characters_across_tokens(tiny_tokenizer):
    """The premise of the streaming tests below: some tokens end mid-character."""
    ids = tiny_tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids
    partial = [i for i in ids if tiny_tokenizer.decode([i]).endswith("\ufffd")]
    assert partial, "no token of MIXED_TEXT ends inside a character"


def test_decode_stream_pieces_join_to_the_full_decode(tiny_tokenizer):
    ids = tiny_tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids
    pieces, decoder = stream_pieces(tiny_tokenizer, ids)
    assert decoder._stream is not None  # the fast path: tokenizers' DecodeStream
    full = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full == decoder.text()
    assert "<|im_end|>" not in full and "🙂 東京 café" in full
    assert all("\ufffd" not in piece for piece in pieces)  # a character is never cut in two
    assert "" in pieces  # ... so some tokens emit nothing until their character completes


@pytest.mark.parametrize("seed", range(5))
def test_decode_stream_on_random_ids_matches_the_full_decode(tiny_tokenizer, seed):
    """What a random tiny model emits: any id sequence, including byte soup and special tokens."""
    ids = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(seed)).tolist()
    pieces, decoder = stream_pieces(tiny_tokenizer, ids)
    full = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) + decoder.flush() == full
    assert full.startswith("".join(pieces))  # only an incomplete last character is held back


def test_a_generation_ending_inside_a_character_still_streams_all_its_text(tiny_tokenizer):
    """Pieces held back for an unfinished character come out with the last event (length) or as
    the result's unstreamed_text (EOS), so the stream always adds up to the full decode."""
    ids = tiny_tokenizer("ok 🙂", add_special_tokens=False).input_ids
    cut = ids[:-1]  # the emoji's last byte never comes
    assert tiny_tokenizer.decode(cut).endswith("\ufffd")
    by_length = generate(ScriptedModel(cut, VOCAB), tiny_tokenizer, [1], SamplingParams(max_new_tokens=len(cut)), [2])
    assert by_length.finish_reason == "length" and by_length.unstreamed_text == ""
    assert "".join(e.text for e in by_length.events) == by_length.text == tiny_tokenizer.decode(cut)
    by_eos = generate(ScriptedModel([*cut, 2], VOCAB), tiny_tokenizer, [1], SamplingParams(max_new_tokens=50), [2])
    assert by_eos.finish_reason == "eos" and by_eos.unstreamed_text.endswith("\ufffd")
    assert "".join(e.text for e in by_eos.events) + by_eos.unstreamed_text == by_eos.text == by_length.text


class SlowTokenizer:
    """A non-``tokenizers`` tokenizer over a fast one's ids: the fallback path decodes windows."""

    def __init__(self, fast) -> None:
        self.fast = fast
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(ids))
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens)


def test_fallback_decoder_for_slow_tokenizers_joins_to_the_full_decode_in_short_windows(tiny_tokenizer):
    ids = tiny_tokenizer(MIXED_TEXT * 4, add_special_tokens=False).input_ids
    slow = SlowTokenizer(tiny_tokenizer)
    pieces, decoder = stream_pieces(slow, ids)
    assert decoder._stream is None
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert max(slow.decoded_lengths) < 8, "the fallback decodes the whole sequence again (quadratic)"


# ---------------------------------------------------------------- the server's async path

def test_agenerate_stream_feeds_the_prompt_then_each_token_and_stops_on_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    script = tiny_tokenizer(" Hello 🙂 world", add_special_tokens=False).input_ids
    model = AsyncScriptedModel([*script, eos, 5], vocab=VOCAB)
    prompt = encode_prompt(tiny_tokenizer, "Say hello", chat=True)
    events, results = collect_async(model, tiny_tokenizer, prompt, SamplingParams(max_new_tokens=50), [eos])
    assert [e.token_id for e in events] == script
    assert model.calls[0] == ("s-1", prompt)
    assert model.calls[1:] == [("s-1", [t]) for t in script]  # one step per generated token, none after EOS
    [result] = results
    assert result.finish_reason == "eos" and result.token_ids == script and result.prompt_token_ids == prompt
    assert "".join(e.text for e in events) == result.text == " Hello 🙂 world"
    assert result.prefill_seconds >= 0 and result.decode_seconds >= 0


def test_agenerate_stream_stops_at_max_new_tokens_without_a_wasted_step(tiny_tokenizer):
    model = AsyncScriptedModel([10, 11, 12, 13, 14], vocab=VOCAB)
    events, [result] = collect_async(model, tiny_tokenizer, [1, 2], SamplingParams(max_new_tokens=3), [2])
    assert [e.token_id for e in events] == [10, 11, 12] and result.finish_reason == "length"
    assert len(model.calls) == 3


def test_agenerate_stream_matches_the_sync_loop_when_sampling_with_a_seed(tiny_tokenizer):
    """Flat logits: the sampled tokens depend only on the seeded generator, in both drivers."""
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=11)

    async def flat(session, ids):
        return torch.zeros(VOCAB)
    events, [result] = collect_async(flat, tiny_tokenizer, [1], params, [])
    sync = generate(lambda session, ids: torch.zeros(VOCAB), tiny_tokenizer, [1], params, eos_token_ids=[])
    assert [e.token_id for e in events] == sync.token_ids == result.token_ids
    assert len(set(result.token_ids)) > 10  # really sampled, not greedy
    assert "".join(e.text for e in events) == sync.text == result.text


def test_agenerate_stream_propagates_a_step_failure_without_finishing(tiny_tokenizer):
    calls = []

    async def failing(session, ids):
        calls.append(ids)
        if len(calls) == 3:
            raise RuntimeError("worker gone")
        logits = torch.zeros(VOCAB)
        logits[40] = 1.0
        return logits

    got, results = [], []

    async def run():
        async for event in agenerate_stream(failing, tiny_tokenizer, [1], SamplingParams(max_new_tokens=10), [2],
                                            "s", on_finish=results.append):
            got.append(event)
    with pytest.raises(RuntimeError, match="worker gone"):
        asyncio.run(run())
    assert [e.token_id for e in got] == [40, 40] and results == []


def test_agenerate_stream_rejects_an_empty_prompt(tiny_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        collect_async(AsyncScriptedModel([1]), tiny_tokenizer, [], SamplingParams(), [2])


class CleaningTokenizer:
    """The tiny tokenizer, but its decode drops the space before punctuation (as transformers'
    clean_up_tokenization_spaces does for WordPiece models) unless asked not to."""

    clean_up_tokenization_spaces = True

    def __init__(self, tokenizer) -> None:
        self.inner = tokenizer
        self.backend_tokenizer = tokenizer.backend_tokenizer

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        text = self.inner.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return text.replace(" .", ".").replace(" ,", ",") if clean else text


def test_streamed_pieces_add_up_even_when_the_tokenizer_cleans_up_spaces(tiny_tokenizer):
    """DecodeStream never cleans up spaces: the final text is decoded the way the stream is, so
    the pieces and the flush add up to it."""
    tokenizer = CleaningTokenizer(tiny_tokenizer)
    ids = tiny_tokenizer("Hello , world . Is it ?", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "Hello, world. Is it ?"  # the premise: a plain decode differs
    pieces, decoder = stream_pieces(tokenizer, ids)
    assert decoder._stream is not None
    assert "".join(pieces) + decoder.flush() == decoder.text() == "Hello , world . Is it ?"
