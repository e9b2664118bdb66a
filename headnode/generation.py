"""Autoregressive generation over any step function, with streamed text.

The step function is the only thing that differs between the in-process engine
and the distributed runtime: ``step(session, new_token_ids) -> logits (V,)``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

try:  # installed with transformers; DecodeStream since tokenizers 0.21
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - the windowed fallback below still works
    Tokenizer = DecodeStream = None  # type: ignore[assignment,misc]

from edgeheads.headnode.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

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
    unstreamed_text: str = ""
    """The end of ``text`` no event carried: the replacement character of an incomplete character
    that EOS cut off (streams hold such bytes back). Events' texts + this == ``text``."""

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
    """Turns a growing list of ids into text deltas without splitting multi-byte characters.

    A fast tokenizer (one backed by the ``tokenizers`` library) streams through
    :class:`tokenizers.decoders.DecodeStream`, which looks only at the last few ids. Other
    tokenizers decode a window from the last emitted boundary: the text the window gained over
    its already-emitted part is the delta (held back while it ends in an incomplete character).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if DecodeStream is not None and isinstance(backend, Tokenizer) else None
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._prefix = 0  # fallback: the window starts here ...
        self._read = 0  # ... and its text up to here was emitted
        self.streamed = ""  # the deltas so far, joined

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        delta = self._step(token_id)
        self.streamed += delta
        return delta

    def flush(self) -> str:
        """What the full decode holds beyond the deltas so far: the text of a trailing incomplete
        character (a replacement character) when generation ends inside one, else "". If the
        full decode does not extend the streamed text at all, nothing more is streamed (and
        a warning says so) rather than a wrong tail."""
        full = self.text()
        if not full.startswith(self.streamed):
            log.warning("streamed text %r is not a prefix of the full decode %r", self.streamed[-40:], full[-40:])
            return ""
        rest = full[len(self.streamed):]
        self.streamed = full
        return rest

    def _step(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        emitted = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) < len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(emitted):]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self) -> str:
        """The whole generated text, decoded as the stream decodes it: without transformers'
        ``clean_up_tokenization_spaces`` (which DecodeStream does not apply), so that the
        streamed pieces add up to it."""
        return self._decode(self.ids)


class TokenLoop:
    """The sampling/stopping/decoding state of one generation, shared by the sync
    (in-process) and async (cluster) drivers: feed logits, get the next event or None."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(params)
        self.decoder = IncrementalDecoder(tokenizer)
        self.events: list[TokenEvent] = []
        self.finish = "length"
        self.t0 = time.perf_counter()
        self.prefill_seconds = 0.0

    def prefilled(self) -> None:
        self.prefill_seconds = time.perf_counter() - self.t0

    def next(self, logits: torch.Tensor) -> TokenEvent | None:
        """Choose the next token; None when generation is over (EOS)."""
        token = self.sampler(logits)
        if self.params.stop_on_eos and token in self.eos_token_ids:
            self.finish = "eos"
            return None
        event = TokenEvent(token, self.decoder.push(token))
        self.events.append(event)
        if not self.wants_more():  # the last token: nothing may stay held back
            event.text += self.decoder.flush()
        return event

    def wants_more(self) -> bool:
        """True when another forward step is needed after the last event."""
        return len(self.events) < self.params.max_new_tokens

    def result(self) -> GenerationResult:
        text = self.decoder.text()
        return GenerationResult(
            text=text, unstreamed_text=text[len(self.decoder.streamed):] if text.startswith(self.decoder.streamed) else "",
            token_ids=list(self.decoder.ids), prompt_token_ids=self.prompt_ids, finish_reason=self.finish,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=time.perf_counter() - self.t0 - self.prefill_seconds, events=self.events)


def generate_stream(step: StepFn, tokenizer: Any, prompt_ids: list[int], params: SamplingParams,
                    eos_token_ids: list[int], session: str | None = None,
                    on_finish: Callable[[GenerationResult], None] | None = None,
                    drop_session: Callable[[str], None] | None = None) -> Iterator[TokenEvent]:
    """Yield one TokenEvent per generated token; call ``on_finish`` with the result."""
    loop = TokenLoop(tokenizer, prompt_ids, params, eos_token_ids)
    session = session or uuid.uuid4().hex
    try:
        logits = step(session, loop.prompt_ids)
        loop.prefilled()
        while (event := loop.next(logits)) is not None:
            yield event
            if not loop.wants_more():
                break
            logits = step(session, [event.token_id])
    finally:
        if drop_session is not None:
            drop_session(session)
    if on_finish is not None:
        on_finish(loop.result())


async def agenerate_stream(step: Callable[[str, list[int]], Awaitable[torch.Tensor]], tokenizer: Any,
                           prompt_ids: list[int], params: SamplingParams, eos_token_ids: list[int], session: str,
                           on_finish: Callable[[GenerationResult], None] | None = None) -> AsyncIterator[TokenEvent]:
    """The async twin of generate_stream (the cluster's step is a coroutine)."""
    loop = TokenLoop(tokenizer, prompt_ids, params, eos_token_ids)
    logits = await step(session, loop.prompt_ids)
    loop.prefilled()
    while (event := loop.next(logits)) is not None:
        yield event
        if not loop.wants_more():
            break
        logits = await step(session, [event.token_id])
    if on_finish is not None:
        on_finish(loop.result())


def generate(step: StepFn, tokenizer: Any, prompt_ids: list[int], params: SamplingParams,
             eos_token_ids: list[int], drop_session: Callable[[str], None] | None = None) -> GenerationResult:
    """Run generate_stream to the end and return the result."""
    results: list[GenerationResult] = []
    for _ in generate_stream(step, tokenizer, prompt_ids, params, eos_token_ids,
                             on_finish=results.append, drop_session=drop_session):
        pass
    return results[0]
