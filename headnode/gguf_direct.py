"""Read a llama-family GGUF straight into ModelParts, its quantized tensors kept quantized.

transformers reads a GGUF by dequantizing every tensor to fp32 (SmolLM2 Q4_1: a 94 MiB file,
540 MB of fp32, ~830 MiB peak), and even its config read goes through ``gguf.GGUFReader``,
which holds each vocabulary string as numpy views (~170 MB for 49k tokens: more than the
model). Here
the header is walked with ``struct`` (string arrays skipped, only counted), each tensor's
bytes are read from the file into one buffer (seek + readinto: no memory map whose pages
would count as ours) and turned into this project's formats (``formats.from_gguf_blocks``):
Q4_0/Q4_1 -> q4, Q8_0 -> int8 in groups of 32, F32/F16/BF16 -> the compute dtype.

The result is what ``slicing.slice_checkpoint`` makes of the transformers model of the same
file, weight for weight once dequantized: llama.cpp's RoPE row permutation of attn_q/attn_k
is undone on whole quantization rows (codes, scales and mins alike), q/k/v rows are grouped
per KV head in one buffer per layer, and gate/up rows are concatenated.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from edgeheads.common import formats
from edgeheads.common.spec import BlockId, BlockKind
from edgeheads.headnode.gguf_config import config_from_metadata, default_rope, lean_config
from edgeheads.headnode.parts_format import with_format
from edgeheads.headnode.slicing import ModelParts, UnsupportedModelError, rope_parameters, shape_from_config

# GGUF general.architecture values read here; llama.cpp permutes attn_q/attn_k rows of "llama"
# files only (qwen2 keeps HF's layout), as transformers' LlamaTensorProcessor assumes
ARCHITECTURES = ("llama", "mistral", "qwen2")
PERMUTED_ARCHITECTURES = ("llama",)
FLOAT_TYPES = {0: ("F32", np.float32), 1: ("F16", np.float16), 30: ("BF16", None)}
QUANT_TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}  # each a 32-element block of GGUF_BLOCK_BYTES
GROUP = formats.Q4_GROUP

# metadata value types (GGUF spec): fixed-size scalars, string (8) and array (9)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 4096  # numeric arrays up to this long are kept; longer ones (token scores) only counted
_MAX_STRING = 1 << 26


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: shape in torch order (rows, cols), ggml type id, absolute offset."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        if self.ggml_type in QUANT_TYPES:
            return n // GROUP * formats.GGUF_BLOCK_BYTES[QUANT_TYPES[self.ggml_type]]
        return n * (4 if self.ggml_type == 0 else 2)


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]  # string arrays (vocabulary, merges) and long numeric arrays: their length
    tensors: dict[str, TensorEntry]
    file_size: int


def _load_error(message: str) -> Exception:
    from edgeheads.headnode.loading import ModelLoadError  # lazily: loading may import this module

    return ModelLoadError(message)


def ggml_type_name(type_id: int) -> str:
    if type_id in FLOAT_TYPES:
        return FLOAT_TYPES[type_id][0]
    if type_id in QUANT_TYPES:
        return QUANT_TYPES[type_id]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"ggml type {type_id}"


# ---------------------------------------------------------------------- header
def _unpack(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack("<" + fmt, data)


def _string(f: BinaryIO) -> str:
    (n,) = _unpack(f, "Q")
    if n > _MAX_STRING:
        raise ValueError(f"a metadata string of {n} bytes")
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])[0]
    if vtype == _STRING:
        return _string(f)
    if vtype != _ARRAY:
        raise ValueError(f"unknown metadata value type {vtype}")
    etype, count = _unpack(f, "IQ")
    if etype in _SCALARS and count <= _KEEP_ARRAY:
        values = list(_unpack(f, f"{count}{_SCALARS[etype]}"))
        return values[0] if count == 1 else values  # transformers unwraps one-element arrays too
    if etype in _SCALARS:
        f.seek(count * struct.calcsize("<" + _SCALARS[etype]), os.SEEK_CUR)
    elif etype == _STRING:
        for _ in range(count):
            (n,) = _unpack(f, "Q")
            f.seek(n, os.SEEK_CUR)
    else:
        for _ in range(count):
            _value(f, etype)
    return count


def read_header(path: str | Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF v2/v3 file, without its tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(4) != b"GGUF":
                raise _load_error(f"{path}: not a GGUF file (no GGUF magic bytes)")
            version, n_tensors, n_kv = _unpack(f, "IQQ")
            if version not in (2, 3):
                raise _load_error(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            metadata = {}
            for _ in range(n_kv):
                key = _string(f)
                (vtype,) = _unpack(f, "I")
                metadata[key] = _value(f, vtype)
            table = []
            for _ in range(n_tensors):
                name = _string(f)
                (n_dims,) = _unpack(f, "I")
                dims = _unpack(f, f"{n_dims}Q") if n_dims else ()
                ggml_type, offset = _unpack(f, "IQ")
                table.append((name, tuple(reversed(dims)), ggml_type, offset))  # ggml lists dims fastest first
            align = int(metadata.get("general.alignment", 32))
            start = (f.tell() + align - 1) // align * align
    except EOFError:
        raise _load_error(f"{path}: truncated GGUF file: it ends inside its header, at {size} bytes") from None
    except (ValueError, struct.error) as err:
        raise _load_error(f"{path}: corrupt GGUF header: {err}") from None
    except OSError as err:
        raise _load_error(f"cannot read {path}: {err}") from err
    tensors = {name: TensorEntry(name, shape, t, start + off) for name, shape, t, off in table}
    return GGUFHeader(metadata, tensors, size)


# ---------------------------------------------------------------------- row maths (pure)
def unpermute_rows(rows: int, n_heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's attn_q/attn_k rows for its RoPE kernel (HF row i of a
    head is stored at 2i, row i + d/2 at 2i + 1). Returns idx: HF row r is GGUF row idx[r]
    (transformers' reverse_permute_weights as an index)."""
    return torch.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(1, 2).reshape(-1)


def qkv_rows(n_heads: int, n_kv_heads: int, head_dim: int, permuted: bool) -> torch.Tensor:
    """Row index into cat(q, k, v) as GGUF stores them giving _slice_llama's layout: per KV
    group g, its q heads' rows, then its k rows, then its v rows."""
    nq, nk = n_heads * head_dim, n_kv_heads * head_dim
    q = unpermute_rows(nq, n_heads) if permuted else torch.arange(nq)
    k = (unpermute_rows(nk, n_kv_heads) if permuted else torch.arange(nk)) + nq
    v = torch.arange(nk) + nq + nk
    per_q = nq // n_kv_heads
    return torch.cat([torch.cat((q[g * per_q:(g + 1) * per_q], k[g * head_dim:(g + 1) * head_dim],
                                 v[g * head_dim:(g + 1) * head_dim])) for g in range(n_kv_heads)])


def tensors_from_bytes(ggml_type: int, raw: np.ndarray, shape: tuple[int, ...],
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A tensor's file bytes (rows, bytes per row) -> {suffix: tensor}: "" (+ ".scale", ".min")
    for quantized ones, whose groups run along the row."""
    if ggml_type in QUANT_TYPES:
        return formats.from_gguf_blocks(QUANT_TYPES[ggml_type], raw, *shape)
    flat = raw.reshape(-1)
    np_dtype = FLOAT_TYPES[ggml_type][1]
    t = torch.from_numpy(flat).view(torch.bfloat16) if np_dtype is None else torch.from_numpy(flat.view(np_dtype))
    return {"": t.reshape(shape).to(dtype)}


def _named(name: str, parts: Mapping[str, torch.Tensor], sl: slice | None = None) -> dict[str, torch.Tensor]:
    return {name + suffix: (t if sl is None else t[sl]) for suffix, t in parts.items()}


# ---------------------------------------------------------------------- reading
def layer_tensor_names(layer: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> list[str]:
    p = f"blk.{layer}."
    names = [p + n + ".weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                           "ffn_gate", "ffn_up", "ffn_down")]
    names += [p + n + ".bias" for n, on in (("attn_q", qkv_bias), ("attn_k", qkv_bias), ("attn_v", qkv_bias),
                                            ("attn_output", o_bias), ("ffn_gate", mlp_bias), ("ffn_up", mlp_bias),
                                            ("ffn_down", mlp_bias)) if on]
    return names


def _check(header: GGUFHeader, names: list[str], fused: list[tuple[str, ...]], path: Path) -> None:
    """Fail before reading: a missing tensor, an unsupported type or shape, tensors fused into
    one (q/k/v, gate/up) stored differently, or a file too short for its tensor table."""
    for name in names:
        entry = header.tensors.get(name)
        if entry is None:
            raise UnsupportedModelError(f"{path.name} has no tensor {name!r}")
        if entry.ggml_type not in FLOAT_TYPES and entry.ggml_type not in QUANT_TYPES:
            raise UnsupportedModelError(
                f"{path.name}: tensor {name} is stored as {entry.type_name}; edgeheads reads GGUF tensors of types "
                f"F32, F16, BF16, Q4_0, Q4_1 and Q8_0 directly (requantize the file, e.g. llama-quantize ... Q4_0)")
        if entry.ggml_type in QUANT_TYPES and (len(entry.shape) != 2 or entry.shape[1] % GROUP):
            raise UnsupportedModelError(f"{path.name}: quantized tensor {name} has shape {entry.shape}; "
                                        f"expected 2-D with inputs in groups of {GROUP}")
        end = entry.offset + entry.nbytes
        if end > header.file_size:
            raise _load_error(f"{path}: truncated GGUF file: tensor {name} ends at byte {end} but the file "
                              f"has {header.file_size} bytes")
    for group in fused:
        kinds = {(header.tensors[n].type_name, header.tensors[n].shape[1:]) for n in group}
        if len(kinds) > 1:
            raise UnsupportedModelError(f"{path.name}: {', '.join(group)} are stored differently "
                                        f"({', '.join(header.tensors[n].type_name for n in group)}) but are "
                                        "fused into one tensor here")


def read_rows(f: BinaryIO, entries: list[TensorEntry], rows: torch.Tensor | None = None) -> np.ndarray:
    """The entries' bytes one after the other as (rows, bytes per row) uint8, read straight from
    the file into one buffer, then (optionally) reordered by the row index ``rows``."""
    width = entries[0].nbytes // entries[0].shape[0]
    raw = np.empty((sum(e.shape[0] for e in entries), width), dtype=np.uint8)
    at = 0
    for e in entries:
        f.seek(e.offset)
        if f.readinto(raw[at:at + e.shape[0]]) != e.nbytes:
            raise _load_error(f"{getattr(f, 'name', 'GGUF file')}: truncated GGUF file: tensor {e.name} is cut short")
        at += e.shape[0]
    return raw if rows is None else raw[rows.numpy()]


def read_int8_per_row(f: BinaryIO, entry: TensorEntry, chunk_rows: int = 4096) -> dict[str, torch.Tensor]:
    """A Q8_0 tensor re-quantized with one scale per row (formats.per_channel_int8), read a
    chunk of rows at a time: neither its file bytes nor its grouped codes exist whole."""
    rows, cols = entry.shape
    width = entry.nbytes // rows
    out = {"": torch.empty((rows, cols), dtype=torch.int8), ".scale": torch.empty((rows, 1), dtype=torch.float16)}
    raw = np.empty((min(chunk_rows, rows), width), dtype=np.uint8)
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        f.seek(entry.offset + start * width)
        if f.readinto(raw[:n]) != n * width:
            raise _load_error(f"{getattr(f, 'name', 'GGUF file')}: truncated GGUF file: tensor {entry.name} is cut short")
        chunk = formats.per_channel_int8(formats.from_gguf_blocks("Q8_0", raw[:n], n, cols), "", chunk_rows=n)
        for suffix, t in chunk.items():
            out[suffix][start:start + n] = t
    return out


def read_gguf_parts(path: str | Path, compute_dtype: torch.dtype = torch.float32, progress: bool = True,
                    int8_per_row: bool = False) -> ModelParts:
    """A llama/mistral/qwen2 GGUF as ModelParts: Q4_0/Q4_1 weights in the q4 format, Q8_0 in
    int8 (groups of 32, or with ``int8_per_row`` re-quantized with one scale per row, which
    torch's fast int8 kernel takes: each value moves at most half a step), F32/F16/BF16
    tensors in ``compute_dtype``; read tensor by tensor, so peak memory stays near the
    quantized size. UnsupportedModelError for other architectures
    (GPT-2 GGUFs load through transformers) and tensor types; ModelLoadError for bad files."""
    path = Path(path)
    header = read_header(path)
    arch = header.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{path.name}: GGUF architecture {arch!r} is not read directly (only "
                                    f"{', '.join(ARCHITECTURES)}); load it through transformers instead")
    names = header.tensors
    tied = "output.weight" not in names
    config = lean_config(header.metadata, names) or config_from_metadata(header.metadata, names)
    present = {hf: torch.empty(1) for g, hf in (
        ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
        ("blk.0.attn_output.bias", "model.layers.0.self_attn.o_proj.bias"),
        ("blk.0.ffn_gate.bias", "model.layers.0.mlp.gate_proj.bias"),
        ("output.weight", "lm_head.weight"), ("token_embd.weight", "model.embed_tokens.weight")) if g in names}
    shape = shape_from_config(config, present, compute_dtype)  # biases and tying as the file has them
    inv_freq, scaling = default_rope(config) if isinstance(config, SimpleNamespace) else rope_parameters(config)
    needed = ["token_embd.weight", "output_norm.weight", *([] if tied else ["output.weight"])]
    fused = []
    for layer in range(shape.n_layers):
        needed += layer_tensor_names(layer, shape.qkv_bias, shape.o_bias, shape.mlp_bias)
        fused += [tuple(f"blk.{layer}.{n}.{kind}" for n in names_) for kind, names_, on in (
            ("weight", ("attn_q", "attn_k", "attn_v"), True), ("weight", ("ffn_gate", "ffn_up"), True),
            ("bias", ("attn_q", "attn_k", "attn_v"), shape.qkv_bias), ("bias", ("ffn_gate", "ffn_up"), shape.mlp_bias))
            if on]
    _check(header, needed, fused, path)

    rope = {"rope.inv_freq": inv_freq.to(compute_dtype), "rope.scaling": torch.tensor(scaling, dtype=compute_dtype)}
    qkv_order = qkv_rows(shape.n_heads, shape.n_kv_heads, shape.head_dim, arch in PERMUTED_ARCHITECTURES)
    with open(path, "rb") as f, tqdm(total=sum(names[n].nbytes for n in needed), unit="B", unit_scale=True,
                                     desc=f"reading {path.name}", disable=not progress, file=sys.stderr) as bar:
        def read(*tensor_names: str, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            """The named tensors, rows concatenated (and reordered by ``rows``), in this project's format."""
            entries = [names[n] for n in tensor_names]
            per_row = int8_per_row and QUANT_TYPES.get(entries[0].ggml_type) == "Q8_0"
            if per_row and len(entries) == 1 and rows is None:
                bar.update(entries[0].nbytes)
                return read_int8_per_row(f, entries[0])  # the embedding: the largest tensor
            raw = read_rows(f, entries, rows)
            bar.update(sum(e.nbytes for e in entries))
            out = tensors_from_bytes(entries[0].ggml_type, raw, (raw.shape[0], *entries[0].shape[1:]), compute_dtype)
            return formats.per_channel_int8(out, "") if per_row else out

        embed = read("token_embd.weight")
        head = {**_named("embed.weight", embed), "norm.weight": read("output_norm.weight")[""],
                **_named("lm_head.weight", embed if tied else read("output.weight"))}
        parts = ModelParts(shape, head)
        per_group = (shape.heads_per_group + 2) * shape.head_dim  # rows of one KV group's q, k and v
        for layer in range(shape.n_layers):
            p = f"blk.{layer}."
            qkv_names = [p + n for n in ("attn_q", "attn_k", "attn_v")]
            norm = read(p + "attn_norm.weight")[""]
            qkv = read(*(n + ".weight" for n in qkv_names), rows=qkv_order)
            qkv_bias = read(*(n + ".bias" for n in qkv_names), rows=qkv_order)[""] if shape.qkv_bias else None
            for g in range(shape.n_kv_heads):
                sl = slice(g * per_group, (g + 1) * per_group)
                w = {"norm.weight": norm, **_named("qkv.weight", qkv, sl), **rope}
                if qkv_bias is not None:
                    w["qkv.bias"] = qkv_bias[sl]
                parts.blocks[BlockId(layer, BlockKind.ATTENTION, g)] = w
            proj = _named("o.weight", read(p + "attn_output.weight"))
            if shape.o_bias:
                proj["o.bias"] = read(p + "attn_output.bias")[""]
            parts.blocks[BlockId(layer, BlockKind.PROJECTION)] = proj
            ffn = {"norm.weight": read(p + "ffn_norm.weight")[""],
                   **_named("gate_up.weight", read(p + "ffn_gate.weight", p + "ffn_up.weight")),
                   **_named("down.weight", read(p + "ffn_down.weight"))}
            if shape.mlp_bias:
                ffn["gate_up.bias"] = read(p + "ffn_gate.bias", p + "ffn_up.bias")[""]
                ffn["down.bias"] = read(p + "ffn_down.bias")[""]
            parts.blocks[BlockId(layer, BlockKind.FFN)] = ffn
    parts.shape = with_format(shape, parts.blocks, compute_dtype)
    return parts
