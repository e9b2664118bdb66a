"""Shared fixtures: the real SmolLM2 checkpoint, its tokenizer, and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The built-in default model file (downloaded once into the user cache)."""
    from edgeheads.headnode import model_cache

    return model_cache.fetch(model_cache.BUILTIN_MODELS["smollm2-135m"], progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(transformers model, tokenizer) for SmolLM2 with real weights, fp32."""
    from edgeheads.headnode.loading import ModelSource, load_transformers

    return load_transformers(ModelSource("gguf", str(smollm2_gguf), "smollm2-135m"))


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session")
def save_tiny_model(tmp_path_factory, smol_tokenizer):
    """Factory: save a random-initialized model for ``config`` (with the SmolLM2 tokenizer)
    as a local transformers directory and return its path."""
    from transformers import AutoModelForCausalLM

    def save(config, name: str, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out)
        smol_tokenizer.save_pretrained(out)
        return out

    return save
