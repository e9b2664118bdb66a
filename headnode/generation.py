"""Autoregressive generation over any step function, with streamed text.

The step function is the only thing that differs between the in-process engine
and the distributed runtime: ``step(session, new_token_ids) -> logits (V,)``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeheads.headnode.sampling import Sampler, SamplingParams

StepFn = Callable[[str, list[int]], torch.Tensor]


def encode_prompt(tokenizer: Any, prompt: str, chat: bool | None) -> list[int]:
    """Token ids of the prompt. chat=None applies the chat template when the tokenizer has
    one; True requires one; False never applies it."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("--chat was given but this model's tokenizer has no chat template")
    if chat or (chat is None and has_template):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(prompt).input_ids)


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the new text this token completes (may be "" mid-character)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "eos" or "length"
    prefill_seconds: float
    decode_seconds: float
    events: list[TokenEvent] = field(default_factory=list, repr=False)

    @property
    def decode_tokens_per_second(self) -> float:
        n = len(self.token_ids) - 1  # the first token comes from the prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": len(self.prompt_token_ids),
                "finish_reason": self.finish_reason, "prefill_seconds": round(self.prefill_seconds, 4),
                "decode_seconds": round(self.decode_seconds, 4),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 2)}


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def generate_stream(step: StepFn, tokenizer: Any, prompt_ids: list[int], params: SamplingParams,
                    eos_token_ids: list[int], session: str | None = None,
                    on_finish: Callable[[GenerationResult], None] | None = None,
                    drop_session: Callable[[str], None] | None = None) -> Iterator[TokenEvent]:
    """Yield one TokenEvent per generated token; call ``on_finish`` with the result."""
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenization")
    session = session or uuid.uuid4().hex
    sampler = Sampler(params)
    decoder = IncrementalDecoder(tokenizer)
    events: list[TokenEvent] = []
    finish = "length"
    t0 = time.perf_counter()
    prefill_seconds = 0.0
    try:
        logits = step(session, prompt_ids)
        prefill_seconds = time.perf_counter() - t0
        for i in range(params.max_new_tokens):
            token = sampler(logits)
            if params.stop_on_eos and token in eos_token_ids:
                finish = "eos"
                break
            event = TokenEvent(token, decoder.push(token))
            events.append(event)
            yield event
            if i + 1 < params.max_new_tokens:
                logits = step(session, [token])
    finally:
        if drop_session is not None:
            drop_session(session)
    if on_finish is not None:
        on_finish(GenerationResult(
            text=decoder.tokenizer.decode(decoder.ids, skip_special_tokens=True), token_ids=list(decoder.ids),
            prompt_token_ids=list(prompt_ids), finish_reason=finish, prefill_seconds=prefill_seconds,
            decode_seconds=time.perf_counter() - t0 - prefill_seconds, events=events))


def generate(step: StepFn, tokenizer: Any, prompt_ids: list[int], params: SamplingParams,
             eos_token_ids: list[int], drop_session: Callable[[str], None] | None = None) -> GenerationResult:
    """Run generate_stream to the end and return the result."""
    results: list[GenerationResult] = []
    for _ in generate_stream(step, tokenizer, prompt_ids, params, eos_token_ids,
                             on_finish=results.append, drop_session=drop_session):
        pass
    return results[0]
