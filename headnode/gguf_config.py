"""A GGUF's model config and RoPE frequencies, from the metadata ``gguf_direct.read_header`` reads.

Two readers of the same keys:
- ``config_from_metadata`` builds the transformers config ``AutoConfig`` would build, by
  transformers' own GGUF key table. It works for every architecture gguf_direct reads, but it
  imports transformers' config and (for RoPE) modeling code: about 80 MiB of a head node's
  resident memory, as much as a 4-bit SmolLM2.
- ``lean_config`` reads a plain llama file (no RoPE scaling, not renamed to mistral) into the
  few fields ``slicing.shape_from_config`` uses, with LlamaConfig's defaults, and
  ``default_rope`` computes its inverse frequencies as transformers' default RoPE does (the
  same float32 expression, so the same bits). It returns None for anything else, and the
  caller falls back to the transformers reader. tests/test_gguf_direct.py checks that both
  give the same shape and the same RoPE tensors.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from types import SimpleNamespace
from typing import Any

import torch

# GGUF "<arch>.<key>" -> LlamaConfig field (transformers' table for llama, as facts)
LLAMA_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim", "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size",
}
LLAMA_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "hidden_act": "silu", "head_dim": None, "num_key_value_heads": None, "sliding_window": None}


def config_from_metadata(metadata: Mapping[str, Any], tensor_names: Container[str]) -> Any:
    """The transformers config ``AutoConfig.from_pretrained(dir, gguf_file=...)`` builds for a
    llama/mistral/qwen2 file, by transformers' own GGUF key table (its legacy reader's rules),
    from the metadata read above: transformers' reader would cost more memory than the model."""
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    arch = metadata["general.architecture"]
    # transformers tests `"mistral" in [general.name]`: only a name of exactly "mistral" renames
    updated = "mistral" if "llama" in arch and metadata.get("general.name") == "mistral" else arch
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, {}).items():
        config.setdefault(key, value)
    for key, value in metadata.items():
        prefix, _, sub = key.replace(arch, updated).partition(".")
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(sub)
        if renamed is not None and renamed != -1:
            config[renamed] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"]  # the vocabulary's length
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def lean_config(metadata: Mapping[str, Any], tensor_names: Container[str]) -> SimpleNamespace | None:
    """The fields shape_from_config and default_rope read, for a plain llama file; None when
    the file needs transformers' reader (another architecture, RoPE scaling, a "mistral" name)."""
    if metadata.get("general.architecture") != "llama" or metadata.get("general.name") == "mistral":
        return None
    if any(key.startswith("llama.rope.scaling") for key in metadata):
        return None
    config: dict[str, Any] = {"model_type": "llama", **LLAMA_DEFAULTS,
                              "tie_word_embeddings": "output.weight" not in tensor_names}
    for key, field in LLAMA_KEYS.items():
        if "llama." + key in metadata:
            config[field] = metadata["llama." + key]
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"]
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    if any(not isinstance(config.get(name), int) for name in required):
        return None  # let transformers' reader name what is missing
    return SimpleNamespace(**config)


def default_rope(config: SimpleNamespace) -> tuple[torch.Tensor, float]:
    """inv_freq (d/2,) fp32 and the attention scaling (1.0) of the original RoPE, computed as
    transformers' ``compute_default_rope_parameters`` does."""
    base = config.rope_theta
    dim = config.head_dim or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv_freq, 1.0
