"""Pure functions: a loaded checkpoint (HF config + state dict) -> the model shape,
the head node's own weights, and one weight set per block.

Block weight names are the block-local names documented in worker/blocks/*.py.
Nothing here copies more than it must: q/k/v rows are concatenated (one fused
matmul per block), everything else is a view of the checkpoint tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from edgeheads.common.formats import dtype_name
from edgeheads.common.spec import SUPPORTED_ARCHITECTURES, BlockId, BlockKind, ModelShape

Weights = dict[str, torch.Tensor]


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not supported."""


@dataclass
class ModelParts:
    """Everything the runtime needs from a checkpoint, already split.

    head: embed.weight (V, D), [pos.weight (P, D) for GPT-2], norm.weight (D,)
    [+ norm.bias], lm_head.weight (V, D) (the same tensor as embed when tied).
    blocks: one weight set per BlockId, in ``shape.block_ids()`` order.
    """

    shape: ModelShape
    head: Weights
    blocks: dict[BlockId, Weights] = field(default_factory=dict)


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def unsupported_message(model_type: str) -> str:
    return (f"unsupported architecture {model_type!r}: edgeheads runs gpt2 and Llama-structured decoders "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})")


def shape_from_config(config: Any, state: Weights, dtype: torch.dtype) -> ModelShape:
    """Read the model shape from a transformers config; biases are read off the state dict."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(unsupported_message(model_type))
    bytes_per_param = torch.empty((), dtype=dtype).element_size()
    compute = dtype_name(dtype)
    if model_type == "gpt2":
        if not getattr(config, "scale_attn_weights", True) or getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedModelError("gpt2 with non-standard attention scaling is not supported")
        D = config.n_embd
        return ModelShape(
            arch="gpt2", n_layers=config.n_layer, hidden_size=D, n_heads=config.n_head, n_kv_heads=config.n_head,
            head_dim=D // config.n_head, intermediate_size=config.n_inner or 4 * D, vocab_size=config.vocab_size,
            norm_eps=config.layer_norm_epsilon, qkv_bias=True, o_bias=True, mlp_bias=True,
            tie_embeddings="lm_head.weight" not in state
            or state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr(),
            max_positions=config.n_positions, bytes_per_param=bytes_per_param, dtype=compute,
            activation=config.activation_function,
        )
    n_heads = config.num_attention_heads
    max_positions = _cfg(config, "max_position_embeddings", default=2048)
    window = getattr(config, "sliding_window", None)
    if window and (model_type != "qwen2" or getattr(config, "use_sliding_window", False)):
        max_positions = min(max_positions, window)  # exact as long as the context fits the window
    prefix = "model.layers.0."
    return ModelShape(
        arch="llama", n_layers=config.num_hidden_layers, hidden_size=config.hidden_size, n_heads=n_heads,
        n_kv_heads=_cfg(config, "num_key_value_heads", default=n_heads),
        head_dim=_cfg(config, "head_dim", default=config.hidden_size // n_heads),
        intermediate_size=config.intermediate_size, vocab_size=config.vocab_size, norm_eps=config.rms_norm_eps,
        qkv_bias=prefix + "self_attn.q_proj.bias" in state, o_bias=prefix + "self_attn.o_proj.bias" in state,
        mlp_bias=prefix + "mlp.gate_proj.bias" in state,
        tie_embeddings="lm_head.weight" not in state
        or state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr(),
        max_positions=max_positions, bytes_per_param=bytes_per_param, dtype=compute, activation=config.hidden_act,
    )


def rope_parameters(config: Any) -> tuple[torch.Tensor, float]:
    """inv_freq (d/2,) fp32 and the attention scaling factor, from the config's rope
    settings (default, linear, llama3, yarn, ...) as transformers computes them."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedModelError(f"rope type {rope_type!r} changes with sequence length and is not supported")
    if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    emb = LlamaRotaryEmbedding(config)
    return emb.inv_freq.detach().float().clone(), float(emb.attention_scaling)


def slice_checkpoint(config: Any, state: Weights) -> ModelParts:
    """Split a full state dict (as ``model.state_dict()`` returns it) into ModelParts."""
    dtype = next(iter(state.values())).dtype
    shape = shape_from_config(config, state, dtype)
    if shape.arch == "gpt2":
        return _slice_gpt2(shape, state)
    return _slice_llama(shape, state, *rope_parameters(config))


def _tensor(state: Weights, name: str) -> torch.Tensor:
    try:
        return state[name]
    except KeyError:
        raise UnsupportedModelError(f"checkpoint has no tensor {name!r}") from None


def _slice_llama(shape: ModelShape, state: Weights, inv_freq: torch.Tensor, rope_scaling: float) -> ModelParts:
    t = lambda name: _tensor(state, name)  # noqa: E731
    embed = t("model.embed_tokens.weight")
    head = {"embed.weight": embed, "norm.weight": t("model.norm.weight"),
            "lm_head.weight": embed if shape.tie_embeddings else t("lm_head.weight")}
    parts = ModelParts(shape, head)
    q, d = shape.heads_per_group, shape.head_dim
    rope = {"rope.inv_freq": inv_freq.to(embed.dtype), "rope.scaling": torch.tensor(rope_scaling, dtype=embed.dtype)}
    for layer in range(shape.n_layers):
        p = f"model.layers.{layer}."
        names = ("q_proj", "k_proj", "v_proj")
        groups = range(shape.n_kv_heads)
        rows = [(slice(g * q * d, (g + 1) * q * d), slice(g * d, (g + 1) * d), slice(g * d, (g + 1) * d))
                for g in groups]
        # every group's q/k/v rows, group after group, in one buffer: each block's qkv.weight is a
        # view of its own rows, and an engine holding all groups can run them as one matmul
        qkv = torch.cat([t(f"{p}self_attn.{n}.weight")[r] for g in groups for n, r in zip(names, rows[g])])
        qkv_bias = (torch.cat([t(f"{p}self_attn.{n}.bias")[r] for g in groups for n, r in zip(names, rows[g])])
                    if shape.qkv_bias else None)
        per_group = (q + 2) * d
        for g in groups:
            w = {"norm.weight": t(p + "input_layernorm.weight"), "qkv.weight": qkv[g * per_group:(g + 1) * per_group],
                 **rope}
            if qkv_bias is not None:
                w["qkv.bias"] = qkv_bias[g * per_group:(g + 1) * per_group]
            parts.blocks[BlockId(layer, BlockKind.ATTENTION, g)] = w
        proj = {"o.weight": t(p + "self_attn.o_proj.weight")}
        if shape.o_bias:
            proj["o.bias"] = t(p + "self_attn.o_proj.bias")
        parts.blocks[BlockId(layer, BlockKind.PROJECTION)] = proj
        ffn = {"norm.weight": t(p + "post_attention_layernorm.weight"),
               "gate_up.weight": torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")]),
               "down.weight": t(p + "mlp.down_proj.weight")}
        if shape.mlp_bias:
            ffn["gate_up.bias"] = torch.cat([t(p + "mlp.gate_proj.bias"), t(p + "mlp.up_proj.bias")])
            ffn["down.bias"] = t(p + "mlp.down_proj.bias")
        parts.blocks[BlockId(layer, BlockKind.FFN)] = ffn
    return parts


def _slice_gpt2(shape: ModelShape, state: Weights) -> ModelParts:
    """GPT-2 stores Conv1D weights as (in, out); blocks use Linear layout (out, in)."""
    t = lambda name: _tensor(state, name)  # noqa: E731
    embed = t("transformer.wte.weight")
    head = {"embed.weight": embed, "pos.weight": t("transformer.wpe.weight"),
            "norm.weight": t("transformer.ln_f.weight"), "norm.bias": t("transformer.ln_f.bias"),
            "lm_head.weight": embed if shape.tie_embeddings else t("lm_head.weight")}
    parts = ModelParts(shape, head)
    D, d = shape.hidden_size, shape.head_dim
    for layer in range(shape.n_layers):
        p = f"transformer.h.{layer}."
        c_attn_w, c_attn_b = t(p + "attn.c_attn.weight"), t(p + "attn.c_attn.bias")  # (D, 3D), (3D,)
        cols = [[slice(part * D + h * d, part * D + (h + 1) * d) for part in range(3)] for h in range(shape.n_heads)]
        qkv = torch.cat([c_attn_w[:, c].T for head in cols for c in head]).contiguous()  # (H*3d, D), head after head
        qkv_bias = torch.cat([c_attn_b[c] for head in cols for c in head])
        for h in range(shape.n_heads):
            parts.blocks[BlockId(layer, BlockKind.ATTENTION, h)] = {
                "norm.weight": t(p + "ln_1.weight"), "norm.bias": t(p + "ln_1.bias"),
                "qkv.weight": qkv[h * 3 * d:(h + 1) * 3 * d], "qkv.bias": qkv_bias[h * 3 * d:(h + 1) * 3 * d],
            }
        parts.blocks[BlockId(layer, BlockKind.PROJECTION)] = {
            "o.weight": t(p + "attn.c_proj.weight").T.contiguous(), "o.bias": t(p + "attn.c_proj.bias")}
        parts.blocks[BlockId(layer, BlockKind.FFN)] = {
            "norm.weight": t(p + "ln_2.weight"), "norm.bias": t(p + "ln_2.bias"),
            "fc.weight": t(p + "mlp.c_fc.weight").T.contiguous(), "fc.bias": t(p + "mlp.c_fc.bias"),
            "out.weight": t(p + "mlp.c_proj.weight").T.contiguous(), "out.bias": t(p + "mlp.c_proj.bias")}
    return parts
