"""Weight formats: how a block's matmul weights are stored (pure tensor functions).

A format is one of ``fp32`` (the exact reference), ``bf16``, ``fp16``, ``int8`` and ``q4``.
Float formats are plain tensors of that dtype. A quantized 2-D weight ``N`` of logical
shape (out, in) is kept as plain tensors in the same dict, so that it serializes, hashes,
migrates and counts its bytes like any other:

- ``int8``: ``N`` int8 codes (out, in) and ``N.scale`` fp16 (out, in // g);
  value = code * scale. One group per row (per output channel) when converted from floats,
  groups of 32 when read from a GGUF Q8_0 tensor.
- ``q4``: ``N`` uint8 (out, in // 2) and ``N.scale``, ``N.min`` fp16 (out, in // 32);
  value = code * scale + min, code in 0..15. Each group of 32 inputs is 16 bytes, byte j
  holding element j in its low nibble and element j + 16 in its high one (GGUF's layout),
  so Q4_0 (min = -8 * scale) and Q4_1 tensors load without a float copy.

Everything else (norms, biases, RoPE constants, GPT-2 position embeddings) is kept in the
compute dtype: the dtype activations travel in and caches are kept in.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

FLOAT_FORMATS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_FORMATS = ("int8", "q4")
FORMATS = (*FLOAT_FORMATS, *QUANT_FORMATS)
Q4_GROUP = 32
SUFFIXES = (".scale", ".min")

# the 2-D weights a format applies to (block-local and head names); everything else is float
MATMUL_WEIGHTS = frozenset({"qkv.weight", "o.weight", "gate_up.weight", "down.weight", "fc.weight", "out.weight",
                            "lm_head.weight", "embed.weight"})


class FormatError(ValueError):
    """An unknown format, or tensors that are not a valid instance of the one they claim."""


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise FormatError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in FLOAT_FORMATS.items():
        if d == dtype:
            return name
    raise FormatError(f"{dtype} is not a compute dtype; known: {', '.join(FLOAT_FORMATS)}")


# ---------------------------------------------------------------------- quantize / dequantize
def quantize_int8(weight: torch.Tensor, group: int | None = None) -> dict[str, torch.Tensor]:
    """Symmetric int8 codes with one fp16 scale per ``group`` inputs of a row (None: the
    whole row).  weight: (out, in) float -> {"": int8 (out, in), ".scale": fp16 (out, in//g)}."""
    out, cols = weight.shape
    g = cols if group is None else group
    if cols % g:
        raise FormatError(f"int8 groups of {g} do not divide {cols} inputs")
    w = weight.detach().float().reshape(out, cols // g, g)
    scale = (w.abs().amax(-1) / 127.0).to(torch.float16)  # (out, in//g)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round(w / safe[..., None]).clamp_(-127, 127).to(torch.int8).reshape(out, cols)
    return {"": codes, ".scale": scale}


def quantize_q4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Asymmetric 4-bit codes in groups of 32 with fp16 scale and min (Q4_1's arithmetic).
    weight: (out, in) float -> {"": uint8 (out, in//2), ".scale", ".min": fp16 (out, in//32)}."""
    out, cols = weight.shape
    if cols % Q4_GROUP:
        raise FormatError(f"q4 needs inputs in groups of {Q4_GROUP}; {cols} is not a multiple")
    w = weight.detach().float().reshape(out, cols // Q4_GROUP, Q4_GROUP)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15.0).to(torch.float16)
    minimum = low.to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round((w - minimum.float()[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    packed = codes[..., :16] | (codes[..., 16:] << 4)  # (out, in//32, 16)
    return {"": packed.reshape(out, cols // 2), ".scale": scale, ".min": minimum}


def q4_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in//2) -> the codes in input order: uint8 (out, in//32, 32)."""
    p = packed.reshape(packed.shape[0], -1, Q4_GROUP // 2)
    return torch.cat((p & 0x0F, p >> 4), dim=-1)


def dequantize(weights: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype,
               rows: slice | torch.Tensor | None = None) -> torch.Tensor:
    """The float values of weight ``name`` in ``dtype``: (out, in), or only ``rows`` of it
    (a slice or an index tensor, as an embedding lookup needs)."""
    codes = weights[name]
    scale = weights.get(name + ".scale")
    if scale is None:
        w = codes if rows is None else codes[rows]
        return w.to(dtype)
    minimum = weights.get(name + ".min")
    if rows is not None:
        codes, scale = codes[rows], scale[rows]
        minimum = None if minimum is None else minimum[rows]
    out = codes.shape[0]
    if minimum is None:  # int8
        g = codes.shape[1] // scale.shape[1]
        w = codes.reshape(out, -1, g).to(dtype) * scale.to(dtype)[..., None]
        return w.reshape(out, -1)
    w = q4_codes(codes).to(dtype) * scale.to(dtype)[..., None] + minimum.to(dtype)[..., None]
    return w.reshape(out, -1)


def per_channel_int8(weights: Mapping[str, torch.Tensor], name: str, chunk_rows: int = 4096) -> dict[str, torch.Tensor]:
    """A grouped int8 weight re-quantized with one scale per row (what torch's fast int8
    kernel takes), a chunk of rows at a time so no whole float copy exists. Each value moves
    by at most half of its row's new step."""
    codes = weights[name]
    parts = [quantize_int8(dequantize(weights, name, torch.float32, rows=slice(i, i + chunk_rows)))
             for i in range(0, codes.shape[0], chunk_rows)]
    return {"": torch.cat([p[""] for p in parts]), ".scale": torch.cat([p[".scale"] for p in parts])}


# ---------------------------------------------------------------------- whole dicts
def format_of(weights: Mapping[str, torch.Tensor], name: str) -> str:
    """The format weight ``name`` is stored in."""
    if name + ".min" in weights:
        return "q4"
    if name + ".scale" in weights:
        return "int8"
    return dtype_name(weights[name].dtype)


def is_component(name: str) -> bool:
    """True for the scale/min tensors that belong to a quantized weight."""
    return name.endswith(SUFFIXES)


def logical_shapes(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each weight's shape as a float tensor, quantized ones folded back to (out, in)."""
    shapes = {}
    for name, t in weights.items():
        if is_component(name):
            continue
        fmt = format_of(weights, name)
        shapes[name] = (t.shape[0], t.shape[1] * 2) if fmt == "q4" else tuple(t.shape)
    return shapes


def compute_dtype_of(weights: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The float dtype of the non-quantized tensors (None when there are none)."""
    dtypes = {t.dtype for n, t in weights.items() if not is_component(n) and format_of(weights, n) in FLOAT_FORMATS}
    if len(dtypes) > 1:
        raise FormatError(f"float weights have mixed dtypes {sorted(map(str, dtypes))}")
    return next(iter(dtypes), None)


def validate(weights: Mapping[str, torch.Tensor]) -> None:
    """Raise FormatError unless every quantized weight's tensors agree with each other."""
    for name, codes in weights.items():
        if is_component(name):
            base = name.rsplit(".", 1)[0]
            if base not in weights:
                raise FormatError(f"{name} has no weight {base}")
            continue
        fmt = format_of(weights, name)
        if fmt in FLOAT_FORMATS:
            continue
        if name + ".scale" not in weights:
            raise FormatError(f"{name}: a {fmt} weight needs {name}.scale")
        scale = weights[name + ".scale"]
        want_codes = torch.int8 if fmt == "int8" else torch.uint8
        if codes.dim() != 2 or codes.dtype != want_codes or scale.dtype != torch.float16 or scale.dim() != 2:
            raise FormatError(f"{name}: {fmt} needs 2-D {want_codes} codes and fp16 scales, got "
                              f"{codes.dtype} {tuple(codes.shape)} and {scale.dtype} {tuple(scale.shape)}")
        cols = codes.shape[1] * (2 if fmt == "q4" else 1)
        groups = cols // Q4_GROUP if fmt == "q4" else scale.shape[1]
        if scale.shape[0] != codes.shape[0] or groups == 0 or cols % groups or scale.shape[1] != groups:
            raise FormatError(f"{name}: scales {tuple(scale.shape)} do not fit codes {tuple(codes.shape)} ({fmt})")
        if fmt == "q4" and tuple(weights[name + ".min"].shape) != tuple(scale.shape):
            raise FormatError(f"{name}: q4 min {tuple(weights[name + '.min'].shape)} differs from scale")


def convert(weights: Mapping[str, torch.Tensor], fmt: str, compute: torch.dtype) -> dict[str, torch.Tensor]:
    """A block's or the head's weights in format ``fmt`` with the rest in ``compute``.
    Float input only (a quantized weight is re-expressed only through its float values)."""
    check_format(fmt)
    out: dict[str, torch.Tensor] = {}
    converted: dict[int, dict[str, torch.Tensor]] = {}  # tied tensors (embed = lm_head) stay shared
    for name, t in weights.items():
        if is_component(name):
            continue
        if name in MATMUL_WEIGHTS and fmt in QUANT_FORMATS and t.dim() == 2:
            key = id(t)
            if key not in converted:
                converted[key] = quantize_int8(t) if fmt == "int8" else quantize_q4(t)
            for suffix, part in converted[key].items():
                out[name + suffix] = part
        elif name in MATMUL_WEIGHTS and fmt in FLOAT_FORMATS:
            out[name] = t.to(FLOAT_FORMATS[fmt])
        else:
            out[name] = t.to(compute) if t.is_floating_point() else t
    return out


# ---------------------------------------------------------------------- GGUF blocks
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def from_gguf_blocks(kind: str, raw: np.ndarray, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """A GGUF quantized tensor's raw bytes (rows * cols/32 blocks, row-major) as this
    module's int8 or q4 tensors, without a float copy. Values are bit-identical to GGUF's
    dequantization (Q4_0: d * (q - 8); Q4_1: d * q + m; Q8_0: d * q)."""
    size = GGUF_BLOCK_BYTES.get(kind)
    if size is None:
        raise FormatError(f"GGUF tensor type {kind} is not read directly; known: {', '.join(GGUF_BLOCK_BYTES)}")
    if cols % Q4_GROUP:
        raise FormatError(f"GGUF {kind}: {cols} columns is not a multiple of {Q4_GROUP}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // Q4_GROUP, size)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])  # (rows, groups)
    if kind == "Q8_0":
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(rows, cols)
        return {"": codes, ".scale": d}
    if kind == "Q4_0":
        packed = torch.from_numpy(blocks[..., 2:].copy()).reshape(rows, cols // 2)
        return {"": packed, ".scale": d, ".min": d * -8.0}  # exact: a power of two
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
    packed = torch.from_numpy(blocks[..., 4:].copy()).reshape(rows, cols // 2)
    return {"": packed, ".scale": d, ".min": m}


# ---------------------------------------------------------------------- the --dtype setting
QUANT_DEFAULT_COMPUTE = "bf16"


def parse_dtype(text: str) -> tuple[str, torch.dtype]:
    """``--dtype`` as (weight format, compute dtype): ``fp32``, ``bf16``, ``fp16`` (weights and
    compute alike), ``int8`` or ``q4`` (compute in bf16), or ``int8:fp32``-style pairs naming
    the compute dtype of a quantized format. ``auto`` is resolved elsewhere, by measurement."""
    fmt, _, compute = text.strip().lower().partition(":")
    check_format(fmt)
    if fmt in FLOAT_FORMATS:
        if compute and compute != fmt:
            raise FormatError(f"{text!r}: a float format computes in itself")
        return fmt, FLOAT_FORMATS[fmt]
    compute = compute or QUANT_DEFAULT_COMPUTE
    if compute not in FLOAT_FORMATS:
        raise FormatError(f"{text!r}: compute dtype {compute!r} unknown; known: {', '.join(FLOAT_FORMATS)}")
    return fmt, FLOAT_FORMATS[compute]
