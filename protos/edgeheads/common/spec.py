"""Model shape and per-block resource formulas (torch-free).

This is the paper's Table I generalized to L layers, grouped-query attention,
gated MLPs and biases. The controller plans with these numbers, the blocks
report them, and tests check them against real parameter counts and K/V tensor
sizes. Notation used in the docstrings:

    D   hidden size                  H     query heads      H_kv  KV heads
    d   head dimension               q     = H / H_kv (query heads per KV group)
    I   MLP intermediate size        b     bytes per parameter / activation element
    S   context length (tokens already in the cache, including the current one)
    T   prompt length (prefill)

A FLOP is one multiply or one add, so a (m x n) @ (n x k) matmul is 2*m*n*k.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

SUPPORTED_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2")


class BlockKind(str, Enum):
    ATTENTION = "attn"
    PROJECTION = "proj"
    FFN = "ffn"


@dataclass(frozen=True, order=True)
class BlockId:
    """One placeable block: ``attn(layer, kv_group)``, ``proj(layer)`` or ``ffn(layer)``."""

    layer: int
    kind: BlockKind
    kv_group: int = 0

    def __str__(self) -> str:
        if self.kind is BlockKind.ATTENTION:
            return f"attn({self.layer},{self.kv_group})"
        return f"{self.kind.value}({self.layer})"

    @classmethod
    def parse(cls, text: str) -> "BlockId":
        """Inverse of ``str()``: ``"attn(3,1)"``, ``"proj(3)"``, ``"ffn(3)"``."""
        try:
            name, rest = text.strip().split("(", 1)
            args = [int(a) for a in rest.rstrip(")").split(",")]
            kind = BlockKind(name)
        except ValueError as err:
            raise ValueError(f"not a block id: {text!r} (expected attn(L,G), proj(L) or ffn(L))") from err
        if kind is BlockKind.ATTENTION and len(args) == 2:
            return cls(args[0], kind, args[1])
        if kind is not BlockKind.ATTENTION and len(args) == 1:
            return cls(args[0], kind)
        raise ValueError(f"not a block id: {text!r} (expected attn(L,G), proj(L) or ffn(L))")


COMPUTE_DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelShape:
    """Everything about a decoder-only model that the block formulas and blocks need.

    ``arch`` is "gpt2" (LayerNorm, GELU MLP, learned positions, Conv1D weights) or
    "llama" (RMSNorm, RoPE, gated SiLU MLP). Llama-structured families (mistral,
    qwen2) map to "llama".
    """

    arch: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    max_positions: int = 2048
    bytes_per_param: int = 4  # of activations and caches: the compute dtype's size
    activation: str = "silu"
    dtype: str = "fp32"  # the compute dtype: activations, caches and every float weight
    weight_bytes_per_param: float = 0.0  # stored weight bytes per parameter (0: bytes_per_param)

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"unknown block arch {self.arch!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute dtype {self.dtype!r}; known: {', '.join(COMPUTE_DTYPES)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not split into {self.n_kv_heads} KV groups")

    @classmethod
    def from_json(cls, text: str) -> "ModelShape":
        """A shape sent over the wire (the JSON of ``to_dict``), every field checked for its type
        (and sizes for being positive), since the dataclass takes anything and a wrong type fails
        only later, deep in the placement or a block. ValueError says what is wrong."""
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("model shape JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError(f"a model shape is a JSON object, not {type(data).__name__}")
        types = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ValueError(f"unknown model shape fields {unknown}")
        for name, value in data.items():
            kind = types[name]
            if kind == "int" and (type(value) is not int or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if kind == "float" and (type(value) not in (int, float) or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
            if kind in ("bool", "str") and type(value).__name__ != kind:
                raise ValueError(f"{name} must be a {kind}, got {value!r}")
        try:
            return cls(**data)
        except TypeError as err:  # a required field missing
            raise ValueError(str(err)) from None

    @property
    def heads_per_group(self) -> int:
        """q = H / H_kv."""
        return self.n_heads // self.n_kv_heads

    @property
    def gated_mlp(self) -> bool:
        return self.arch == "llama"

    @property
    def norm_params(self) -> int:
        """RMSNorm has a weight (D); LayerNorm has a weight and a bias (2D)."""
        return self.hidden_size if self.arch == "llama" else 2 * self.hidden_size

    def block_ids(self) -> list[BlockId]:
        """All blocks in execution order: per layer, the attention groups, then proj, then ffn."""
        return block_ids(self.n_layers, self.n_kv_heads)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- parameters


def layer_block_ids(layer: int, kv_groups: int) -> list[BlockId]:
    """The blocks of one layer in execution order: attn(layer, 0..kv_groups-1), proj, ffn.
    The one enumeration of blocks: everything that walks a model's blocks goes through it."""
    return [*(BlockId(layer, BlockKind.ATTENTION, g) for g in range(kv_groups)),
            BlockId(layer, BlockKind.PROJECTION), BlockId(layer, BlockKind.FFN)]


def block_ids(n_layers: int, kv_groups: int) -> list[BlockId]:
    """Every block of an ``n_layers`` model with ``kv_groups`` KV groups, in execution order."""
    return [b for layer in range(n_layers) for b in layer_block_ids(layer, kv_groups)]


def attention_params(shape: ModelShape) -> int:
    """Parameters of one ``attn(l, g)`` block.

    (q + 2) * d * D     rows of W_q (q heads), W_k and W_v (one KV head)
    + (q + 2) * d       their biases, when the model has q/k/v bias
    + D or 2D           the pre-attention norm (RMSNorm / LayerNorm); every attention
                        block of a layer holds its own copy, so a layer's blocks
                        together hold (H_kv - 1) more norms than the checkpoint
    """
    rows = (shape.heads_per_group + 2) * shape.head_dim
    return rows * shape.hidden_size + (rows if shape.qkv_bias else 0) + shape.norm_params


def projection_params(shape: ModelShape) -> int:
    """Parameters of ``proj(l)``: W_o is D x (H * d), plus a D bias when present."""
    return shape.hidden_size * shape.n_heads * shape.head_dim + (shape.hidden_size if shape.o_bias else 0)


def ffn_params(shape: ModelShape) -> int:
    """Parameters of ``ffn(l)``.

    gated (Llama):  3 * D * I  (gate, up, down)  + 2I + D biases if any  + D norm
    plain (GPT-2):  2 * D * I  (fc, proj)        + I + D biases          + 2D norm
    """
    D, I = shape.hidden_size, shape.intermediate_size
    if shape.gated_mlp:
        return 3 * D * I + ((2 * I + D) if shape.mlp_bias else 0) + shape.norm_params
    return 2 * D * I + I + D + shape.norm_params


def block_params(shape: ModelShape, kind: BlockKind) -> int:
    return {
        BlockKind.ATTENTION: attention_params,
        BlockKind.PROJECTION: projection_params,
        BlockKind.FFN: ffn_params,
    }[kind](shape)


def headnode_params(shape: ModelShape) -> int:
    """Parameters the head node keeps: token embeddings (V x D), the final norm,
    learned positions for GPT-2 (P x D) and an untied LM head (V x D)."""
    D = shape.hidden_size
    n = shape.vocab_size * D + shape.norm_params
    if shape.arch == "gpt2":
        n += shape.max_positions * D
    if not shape.tie_embeddings:
        n += shape.vocab_size * D
    return n


# ----------------------------------------------------------------------------- memory


def block_weight_bytes(shape: ModelShape, kind: BlockKind) -> int:
    """Weight memory of one block: params * bytes per stored parameter (quantized formats
    store less than the compute dtype's b)."""
    return int(block_params(shape, kind) * (shape.weight_bytes_per_param or shape.bytes_per_param))


def kv_bytes_per_token(shape: ModelShape, kind: BlockKind) -> int:
    """K/V cache growth per token: 2 * d * b for an attention block (one K and one V
    row of its KV head), 0 for proj and ffn."""
    return 2 * shape.head_dim * shape.bytes_per_param if kind is BlockKind.ATTENTION else 0


def block_memory_bytes(shape: ModelShape, kind: BlockKind, context_tokens: int) -> int:
    """Weights plus the K/V cache holding ``context_tokens`` tokens (one session)."""
    return block_weight_bytes(shape, kind) + context_tokens * kv_bytes_per_token(shape, kind)


def activation_bytes(shape: ModelShape, kind: BlockKind) -> int:
    """Bytes one block emits per token: q * d * b for attention (its heads' outputs),
    D * b for proj and ffn (the residual stream)."""
    if kind is BlockKind.ATTENTION:
        return shape.heads_per_group * shape.head_dim * shape.bytes_per_param
    return shape.hidden_size * shape.bytes_per_param


# ----------------------------------------------------------------------------- compute


def attention_flops_decode(shape: ModelShape, context_tokens: int) -> int:
    """FLOPs of ``attn(l, g)`` for one decoded token attending over S = context_tokens.

    2 * D * (q + 2) * d     q/k/v projection
    + 4 * q * d * S         scores (q·k) and the weighted sum of v, per query head
    + 5 * q * S             scale, softmax (max, exp, sum, divide)
    + 4 * D                 norm
    + 3 * (q + 1) * d       RoPE on the q heads and the k head (Llama only)
    """
    D, d, q, S = shape.hidden_size, shape.head_dim, shape.heads_per_group, context_tokens
    flops = 2 * D * (q + 2) * d + 4 * q * d * S + 5 * q * S + 4 * D
    if shape.arch == "llama":
        flops += 3 * (q + 1) * d
    return flops


def attention_flops_prefill(shape: ModelShape, prompt_tokens: int) -> float:
    """Mean FLOPs per token of ``attn(l, g)`` over a causal prefill of T tokens: token t
    attends over t + 1 positions, so the mean context is (T + 1) / 2."""
    T = prompt_tokens
    D, d, q = shape.hidden_size, shape.head_dim, shape.heads_per_group
    mean_ctx = (T + 1) / 2
    flops = 2 * D * (q + 2) * d + 4 * q * d * mean_ctx + 5 * q * mean_ctx + 4 * D
    if shape.arch == "llama":
        flops += 3 * (q + 1) * d
    return flops


def projection_flops(shape: ModelShape) -> int:
    """FLOPs of ``proj(l)`` per token: 2 * (H * d) * D for W_o, plus D for the residual."""
    return 2 * shape.n_heads * shape.head_dim * shape.hidden_size + shape.hidden_size


def ffn_flops(shape: ModelShape) -> int:
    """FLOPs of ``ffn(l)`` per token.

    gated: 6 * D * I (three matmuls) + 5 * I (SiLU and the gate product) + 4D norm + D residual
    plain: 4 * D * I (two matmuls)   + 8 * I (GELU)                      + 4D norm + D residual
    """
    D, I = shape.hidden_size, shape.intermediate_size
    if shape.gated_mlp:
        return 6 * D * I + 5 * I + 5 * D
    return 4 * D * I + 8 * I + 5 * D


def block_flops_decode(shape: ModelShape, kind: BlockKind, context_tokens: int) -> float:
    """FLOPs for one decoded token (context-dependent only for attention)."""
    if kind is BlockKind.ATTENTION:
        return attention_flops_decode(shape, context_tokens)
    return projection_flops(shape) if kind is BlockKind.PROJECTION else ffn_flops(shape)


def block_flops_prefill(shape: ModelShape, kind: BlockKind, prompt_tokens: int) -> float:
    """Mean FLOPs per prompt token during prefill."""
    if kind is BlockKind.ATTENTION:
        return attention_flops_prefill(shape, prompt_tokens)
    return projection_flops(shape) if kind is BlockKind.PROJECTION else ffn_flops(shape)


def headnode_flops(shape: ModelShape) -> int:
    """FLOPs per token at the head node: the final norm and the LM head (2 * D * V)."""
    return 2 * shape.hidden_size * shape.vocab_size + 4 * shape.hidden_size


# ----------------------------------------------------------------------------- named shapes

SMOLLM2_135M = ModelShape(
    arch="llama", n_layers=30, hidden_size=576, n_heads=9, n_kv_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, norm_eps=1e-5, tie_embeddings=True, max_positions=8192,
)

LLAMA2_7B = ModelShape(
    arch="llama", n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8, head_dim=128,
    intermediate_size=11008, vocab_size=32000, norm_eps=1e-5, tie_embeddings=False, max_positions=4096,
    bytes_per_param=2,
)
"""A 7B-class shape with 8 KV groups (Llama-3-8B-like attention on a Llama-2-7B body), fp16."""

GPT2_SMALL = ModelShape(
    arch="gpt2", n_layers=12, hidden_size=768, n_heads=12, n_kv_heads=12, head_dim=64,
    intermediate_size=3072, vocab_size=50257, norm_eps=1e-5, qkv_bias=True, o_bias=True, mlp_bias=True,
    tie_embeddings=True, max_positions=1024, activation="gelu_new",
)
