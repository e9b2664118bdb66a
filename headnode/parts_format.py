"""ModelParts in another weight format (pure; edgeheads.common.formats holds the maths).

Each layer's attention blocks keep their q/k/v rows (and, when quantized, their scales
and mins) as views of one buffer per tensor, group after group, as slicing lays them
out, so an engine or worker holding the whole layer runs them as one matmul without
copying them together again.
"""

from __future__ import annotations

import dataclasses

import torch

from edgeheads.common.formats import FLOAT_FORMATS, check_format, convert, dequantize, dtype_name, logical_shapes
from edgeheads.common.spec import BlockKind, ModelShape, block_params
from edgeheads.headnode.slicing import ModelParts


def convert_parts(parts: ModelParts, fmt: str, compute: torch.dtype) -> ModelParts:
    """``parts`` with matmul weights in ``fmt`` and every other float in ``compute``.
    The input is float; it is left unchanged."""
    check_format(fmt)
    if compute not in FLOAT_FORMATS.values():
        raise ValueError(f"{compute} is not a compute dtype")
    out = ModelParts(parts.shape, convert(parts.head, fmt, compute))
    by_layer: dict[int, list] = {}
    for block_id in parts.blocks:
        if block_id.kind is BlockKind.ATTENTION:
            by_layer.setdefault(block_id.layer, []).append(block_id)
    for block_id, weights in parts.blocks.items():
        if block_id.kind is not BlockKind.ATTENTION:
            out.blocks[block_id] = convert(weights, fmt, compute)
        elif block_id == min(by_layer[block_id.layer]):
            out.blocks.update(_convert_layer_attention(parts, sorted(by_layer[block_id.layer]), fmt, compute))
    out.blocks = {b: out.blocks[b] for b in parts.blocks}  # the input's order
    out.shape = with_format(parts.shape, out.blocks, compute)
    return out


def with_format(shape: ModelShape, blocks: dict, compute: torch.dtype) -> ModelShape:
    """``shape`` computing in ``compute``, with the blocks' real stored bytes per parameter
    (what the controller's memory model multiplies by)."""
    stored = sum(t.nbytes for w in blocks.values() for n, t in w.items() if not n.startswith("rope."))
    params = sum(block_params(shape, b.kind) for b in blocks)
    itemsize = torch.empty((), dtype=compute).element_size()
    return dataclasses.replace(shape, dtype=dtype_name(compute), bytes_per_param=itemsize,
                               weight_bytes_per_param=stored / params if params else 0.0)


def _convert_layer_attention(parts: ModelParts, ids: list, fmt: str, compute: torch.dtype) -> dict:
    """One layer's attention blocks: the groups' ``qkv.*`` rows converted as one tensor and
    split back into per-group views; the rest per block."""
    firsts = [parts.blocks[b] for b in ids]
    fused = {n: torch.cat([w[n] for w in firsts]) for n in ("qkv.weight", "qkv.bias") if n in firsts[0]}
    converted = convert(fused, fmt, compute)
    result = {}
    for i, block_id in enumerate(ids):
        rest = {n: t for n, t in parts.blocks[block_id].items() if n not in fused}
        weights = convert(rest, fmt, compute)
        for name, t in converted.items():
            rows = t.shape[0] // len(ids)
            weights[name] = t[i * rows:(i + 1) * rows]
        result[block_id] = weights
    return result


def float_parts(parts: ModelParts, compute: torch.dtype) -> ModelParts:
    """``parts`` (quantized as a GGUF stores them) with every weight dequantized to ``compute``:
    the float model transformers would load from the same file, value for value, with each
    layer's attention q/k/v rows again views of one buffer. Used to read a GGUF in a float or
    another format without transformers' GGUF reader (headnode/loading.py)."""
    def dequantized(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: dequantize(weights, n, compute) for n in logical_shapes(weights)}

    out = ModelParts(parts.shape, dequantized(parts.head))
    if parts.shape.tie_embeddings:
        out.head["lm_head.weight"] = out.head["embed.weight"]
    by_layer: dict[int, list] = {}
    for block_id, weights in parts.blocks.items():
        out.blocks[block_id] = dequantized(weights)
        if block_id.kind is BlockKind.ATTENTION:
            by_layer.setdefault(block_id.layer, []).append(block_id)
    for ids in by_layer.values():
        for name in ("qkv.weight", "qkv.bias"):
            if name in out.blocks[ids[0]]:
                fused = torch.cat([out.blocks[b][name] for b in ids])
                rows = fused.shape[0] // len(ids)
                for i, b in enumerate(ids):
                    out.blocks[b][name] = fused[i * rows:(i + 1) * rows]
    out.shape = with_format(parts.shape, out.blocks, compute)
    return out
