"""Matmul and lookup kernels over weights in any format (edgeheads.common.formats).

``linear`` is the one entry point the blocks and the head use. Float weights go straight
to ``F.linear``; quantized ones are dequantized into the activations' dtype and then
multiplied (the portable kernel). Other kernels for a format can be registered under a
name and picked by measurement (``worker/kernel_probe.py``); every kernel of a format
must give the same values as ``dequant`` up to float rounding, and the kernel in use is
one process-wide choice so that an engine and a cluster on the same choice agree
token for token.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from edgeheads.common.formats import Q4_GROUP, dequantize, format_of, q4_codes

Kernel = Callable[[torch.Tensor, Mapping[str, torch.Tensor], str, "torch.Tensor | None"], torch.Tensor]


def dequant_linear(x: torch.Tensor, weights: Mapping[str, torch.Tensor], name: str,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., in) -> (..., out), the weight dequantized into x's dtype first."""
    return F.linear(x, dequantize(weights, name, x.dtype), bias)


_prepared: dict[tuple, tuple] = {}  # (kernel, id(codes), dtype) -> the kernel's own form of a weight


def prepared(kernel: str, codes: torch.Tensor, dtype: torch.dtype, make: Callable[[], tuple]) -> tuple:
    """A kernel's one-time rearrangement of a weight (packed codes, scales in the compute
    dtype), kept while the codes tensor lives."""
    key = (kernel, id(codes), codes.data_ptr(), dtype)
    found = _prepared.get(key)
    if found is None:
        found = _prepared[key] = make()
        weakref.finalize(codes, _prepared.pop, key, None)
    return found


def int8pack_linear(x: torch.Tensor, weights: Mapping[str, torch.Tensor], name: str,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch's int8 weight-only matmul (per-channel scales only; others dequantize)."""
    codes, scale = weights[name], weights[name + ".scale"]
    if scale.shape[1] != 1 or codes.device.type != "cpu":
        return dequant_linear(x, weights, name, bias)
    (scales,) = prepared("int8pack", codes, x.dtype, lambda: (scale.reshape(-1).to(x.dtype),))
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), codes, scales).view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def _int4pack(weights: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> tuple:
    codes, scale, minimum = weights[name], weights[name + ".scale"], weights[name + ".min"]
    values = q4_codes(codes).reshape(codes.shape[0], -1).to(torch.int32)  # (N, K)
    packed = torch._convert_weight_to_int4pack_for_cpu(values, 2)
    # the kernel computes (code - 8) * scale + zero: zero = min + 8 * scale
    scale32, min32 = scale.float(), minimum.float()
    scale_zero = torch.stack((scale32, min32 + 8 * scale32), dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, scale_zero  # (N, K/2) uint8, (K/32, N, 2)


def pack_in_place(weights: Mapping[str, torch.Tensor], dtype: torch.dtype) -> int:
    """For weights that nothing will ever read back or ship (the in-process engine's): overwrite
    each q4 weight's codes with the int4 kernel's packed layout, which has the same size, and
    register them as their own prepared form, so the weight is held once instead of beside a
    repacked copy. Afterwards only ``int4pack_linear`` (in ``dtype``, on these tensor objects)
    reads those codes correctly: dequantizing them gives wrong values. Returns the bytes saved."""
    saved = 0
    for name in [n for n in weights if n + ".min" in weights]:
        codes = weights[name]
        if codes.device.type != "cpu" or ("int4pack", id(codes), codes.data_ptr(), dtype) in _prepared:
            continue
        packed, scale_zero = _int4pack(weights, name, dtype)
        if packed.shape != codes.shape or packed.dtype != codes.dtype:  # another torch's layout: keep both
            continue
        codes.copy_(packed)
        prepared("int4pack", codes, dtype, lambda: (codes, scale_zero))
        saved += packed.nbytes
    return saved


def int4pack_linear(x: torch.Tensor, weights: Mapping[str, torch.Tensor], name: str,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch's grouped 4-bit weight-only matmul for CPU (weights repacked once, or in place)."""
    codes = weights[name]
    if codes.device.type != "cpu":
        return dequant_linear(x, weights, name, bias)
    packed, scale_zero = prepared("int4pack", codes, x.dtype, lambda: _int4pack(weights, name, x.dtype))
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), packed, Q4_GROUP, scale_zero)
    y = y.view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


KERNELS: dict[str, dict[str, Kernel]] = {"int8": {"dequant": dequant_linear, "int8pack": int8pack_linear},
                                         "q4": {"dequant": dequant_linear, "int4pack": int4pack_linear}}
PREFERENCE = {"int8": ("int8pack", "dequant"), "q4": ("int4pack", "dequant")}  # first: the default
_chosen: dict[tuple[str, torch.dtype], str] = {}  # (format, compute dtype) -> kernel; unset: PREFERENCE[0]


def choose(fmt: str, kernel: str, dtype: torch.dtype) -> None:
    """Use ``kernel`` for every weight of format ``fmt`` computed in ``dtype`` from now on."""
    if kernel not in KERNELS.get(fmt, {}):
        raise ValueError(f"no kernel {kernel!r} for {fmt}; known: {sorted(KERNELS.get(fmt, {}))}")
    _chosen[(fmt, dtype)] = kernel


def kernel_for(fmt: str, dtype: torch.dtype) -> str:
    """The kernel weights of ``fmt`` computed in ``dtype`` use."""
    return _chosen.get((fmt, dtype), PREFERENCE[fmt][0])


def linear(x: torch.Tensor, weights: Mapping[str, torch.Tensor], name: str,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for weight ``name`` of ``weights`` in whatever format it is stored.
    x: (..., in) -> (..., out) in x's dtype."""
    w = weights[name]
    if name + ".scale" not in weights:
        return F.linear(x, w, bias)
    fmt = format_of(weights, name)
    return KERNELS[fmt][kernel_for(fmt, x.dtype)](x, weights, name, bias)


def residual_linear(residual: torch.Tensor, x: torch.Tensor, weights: Mapping[str, torch.Tensor], name: str,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """residual + x @ W.T (+ bias), the residual added inside the matmul for a float weight
    without bias.  residual: (1, T, D_out), x: (1, T, D_in) -> (1, T, D_out)."""
    w = weights[name]
    if bias is not None or name + ".scale" in weights:
        return residual + linear(x, weights, name, bias)
    out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), w.t())
    return out.view(residual.shape)


def embedding(token_ids: torch.Tensor, weights: Mapping[str, torch.Tensor], name: str,
              dtype: torch.dtype) -> torch.Tensor:
    """Rows ``token_ids`` (T,) of weight ``name`` in ``dtype``: (T, D). Quantized tables
    dequantize only the rows looked up."""
    if name + ".scale" not in weights:
        return F.embedding(token_ids, weights[name]).to(dtype)
    return dequantize(weights, name, dtype, rows=token_ids)


def formats_in(weights: Mapping[str, torch.Tensor]) -> set[str]:
    """The quantized formats among ``weights``' matmul weights."""
    return {format_of(weights, n) for n in weights if n + ".scale" in weights}


class UnrunnableFormat(RuntimeError):
    """This process cannot compute with weights of a format in a compute dtype on a device."""


_runnable: dict[tuple, str] = {}  # (format, kernel, dtype, device type) -> "" or why not


def check_runnable(weights: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Run every format of ``weights``' matmul weights once, small, with the kernel in use, in
    ``dtype`` on their device, against the dequantized reference; UnrunnableFormat says which
    format cannot run here and why (a missing kernel, an unsupported dtype, wrong values)."""
    from edgeheads.common.formats import FLOAT_FORMATS, convert, is_component

    for name, t in weights.items():
        if is_component(name) or t.dim() != 2:
            continue
        fmt = format_of(weights, name)
        kernel = kernel_for(fmt, dtype) if fmt in KERNELS else ""
        key = (fmt, kernel, dtype, t.device.type)
        if key not in _runnable:
            _runnable[key] = _trial(fmt, dtype, t.device, convert, FLOAT_FORMATS)
        if _runnable[key]:
            raise UnrunnableFormat(f"{fmt} weights ({kernel or 'F.linear'}) with {dtype} compute cannot run on "
                                   f"{t.device.type} here: {_runnable[key]}")


def _trial(fmt: str, dtype: torch.dtype, device: torch.device, convert, float_formats) -> str:
    """"" when one small matmul of ``fmt`` in ``dtype`` runs and agrees with its reference."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=gen) * 0.05
    small = {n: v.to(device) for n, v in convert({"o.weight": weight}, fmt, dtype).items()}
    x = torch.randn(2, 128, generator=gen).to(device, dtype)
    try:
        got = linear(x, small, "o.weight").float()
        want = F.linear(x.float(), dequantize(small, "o.weight", torch.float32))
    except (RuntimeError, NotImplementedError, TypeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    error = float((got - want).abs().max())
    if got.shape != want.shape or not error <= tolerance * float(want.abs().max()):
        return f"wrong values (max error {error:.3g})"
    return ""
