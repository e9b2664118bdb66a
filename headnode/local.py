"""The in-process generator: a loaded model on a BlockEngine (the CLI's --local path)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.generation import GenerationResult, TokenEvent, encode_prompt, generate, generate_stream
from edgeheads.headnode.loading import LoadedModel
from edgeheads.headnode.sampling import SamplingParams


class LocalGenerator:
    def __init__(self, model: LoadedModel, own_weights: bool = False) -> None:
        """``own_weights``: the model is this generator's alone, so its engine may pack q4
        weights in place (BlockEngine's ``pack_weights``): held once, not beside a packed copy."""
        self.model = model
        self.engine = BlockEngine(model.parts, pack_weights=own_weights)

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        return encode_prompt(self.model.tokenizer, prompt, chat)

    def _step(self, prompt_ids: list[int], params: SamplingParams):
        """engine.forward with caches preallocated for the whole generation (prompt + new tokens)."""
        reserve = len(prompt_ids) + params.max_new_tokens
        return lambda session, ids: self.engine.forward(session, ids, reserve_tokens=reserve)

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        return generate(self._step(prompt_ids, params), self.model.tokenizer, prompt_ids, params,
                        self.model.eos_token_ids, drop_session=self.engine.drop_session)

    def generate(self, prompt: str, params: SamplingParams, chat: bool | None = None) -> GenerationResult:
        return self.generate_ids(self.encode(prompt, chat), params)

    def stream(self, prompt: str, params: SamplingParams, chat: bool | None = None,
               on_finish=None) -> Iterator[TokenEvent]:
        prompt_ids = self.encode(prompt, chat)
        return generate_stream(self._step(prompt_ids, params), self.model.tokenizer, prompt_ids, params,
                               self.model.eos_token_ids, on_finish=on_finish, drop_session=self.engine.drop_session)


def set_threads() -> None:
    """Use every core for intra-op parallelism (torch's default can be lower in containers)."""
    import os

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
