"""Weight formats (edgeheads.common.formats) as pure tensor functions: quantization error
bounds, GGUF blocks read bit-exactly as the gguf package dequantizes them, validation of
inconsistent tensors, conversion of whole weight dicts, the --dtype strings and the ``auto``
rule (headnode/dtype_choice.py) on faked CPUs."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgeheads.common import formats
from edgeheads.common.formats import FormatError
from edgeheads.headnode import dtype_choice

Q = gguf.GGMLQuantizationType
HALF_ULP_FP16 = 2.0 ** -11  # relative rounding of a value to fp16 (11-bit significand)


def weight(rows: int = 8, cols: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[1] *= 50.0  # rows of very different magnitudes: one scale per row/group must follow them
    w[2] *= 1e-3
    return w


# ---------------------------------------------------------------------- error bounds
@pytest.mark.parametrize("group", [None, 32])
def test_int8_error_is_at_most_half_a_step(group):
    w = weight()
    q = formats.quantize_int8(w, group)
    assert q[""].dtype == torch.int8 and q[".scale"].dtype == torch.float16
    g = w.shape[1] if group is None else group
    assert q[".scale"].shape == (w.shape[0], w.shape[1] // g)
    deq = formats.dequantize({"w": q[""], "w.scale": q[".scale"]}, "w", torch.float32)
    step = q[".scale"].float().repeat_interleave(g, dim=1)  # each element's own scale
    amax = w.abs().reshape(w.shape[0], -1, g).amax(-1).repeat_interleave(g, dim=1)
    # rounding to the nearest code moves a value by at most step/2; the scale, rounded to fp16,
    # can be up to half an fp16 ulp below amax/127, so the largest value may clamp at 127 and
    # move by at most amax * 2^-11 more (< step/15: a floor instead of round would still fail)
    bound = step / 2 + amax * HALF_ULP_FP16 + 1e-7
    err = (w - deq).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    assert err.max() > 0  # real quantization happened


def test_q4_error_is_at_most_half_a_step():
    w = weight(cols=128)
    q = formats.quantize_q4(w)
    assert q[""].dtype == torch.uint8 and q[""].shape == (8, 64)
    assert q[".scale"].shape == q[".min"].shape == (8, 4)
    deq = formats.dequantize({"w": q[""], "w.scale": q[".scale"], "w.min": q[".min"]}, "w", torch.float32)
    step = q[".scale"].float().repeat_interleave(32, dim=1)
    amax = w.abs().reshape(8, 4, 32).amax(-1).repeat_interleave(32, dim=1)
    # min and scale are fp16-rounded: the group's ends may clamp at code 0 or 15 by at most
    # that rounding (min's and 15 scales', both <= amax * 2^-11 each)
    bound = step / 2 + 2 * amax * HALF_ULP_FP16 + 1e-7
    err = (w - deq).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    codes = formats.q4_codes(q[""])
    assert codes.min() == 0 and codes.max() == 15  # each group spans the whole code range


def test_q4_layout_is_gguf_nibbles():
    """Byte j of a group holds element j low and element j + 16 high."""
    w = torch.arange(32, dtype=torch.float32)[None]  # min 0, scale 31/15: codes round(k * 15/31)
    q = formats.quantize_q4(w)
    codes = torch.round(torch.arange(32) / q[".scale"].float()[0, 0]).to(torch.uint8)
    assert torch.equal(q[""][0] & 0x0F, codes[:16]) and torch.equal(q[""][0] >> 4, codes[16:])
    assert torch.equal(formats.q4_codes(q[""])[0, 0], codes)


@pytest.mark.parametrize("fmt", ["int8", "int8/32", "q4"])
def test_zero_and_constant_rows_do_not_give_nan(fmt):
    w = weight(rows=4, cols=64)
    w[0] = 0.0  # an all-zero row
    w[1, :32] = 0.0  # an all-zero group
    w[2, :32] = 0.75  # a constant group (q4: high == low, scale 0)
    if fmt == "q4":
        q = formats.quantize_q4(w)
        weights = {"w": q[""], "w.scale": q[".scale"], "w.min": q[".min"]}
    else:
        q = formats.quantize_int8(w, 32 if fmt == "int8/32" else None)
        weights = {"w": q[""], "w.scale": q[".scale"]}
    deq = formats.dequantize(weights, "w", torch.float32)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], torch.zeros(64)) and torch.equal(deq[1, :32], torch.zeros(32))
    assert torch.allclose(deq[2, :32], torch.full((32,), 0.75), rtol=2 * HALF_ULP_FP16, atol=0)


def test_dequantize_rows_and_dtypes():
    w = weight(rows=6, cols=64)
    q = formats.quantize_q4(w)
    weights = {"w": q[""], "w.scale": q[".scale"], "w.min": q[".min"]}
    full = formats.dequantize(weights, "w", torch.float32)
    ids = torch.tensor([4, 0, 4])
    assert torch.equal(formats.dequantize(weights, "w", torch.float32, rows=ids), full[ids])
    assert torch.equal(formats.dequantize(weights, "w", torch.float32, rows=slice(1, 3)), full[1:3])
    assert formats.dequantize(weights, "w", torch.bfloat16).dtype == torch.bfloat16
    assert formats.dequantize({"w": w}, "w", torch.float16).dtype == torch.float16  # a float weight: a cast


def test_quantizers_refuse_widths_that_do_not_group():
    with pytest.raises(FormatError, match="multiple"):
        formats.quantize_q4(torch.randn(2, 48))
    with pytest.raises(FormatError, match="divide"):
        formats.quantize_int8(torch.randn(2, 48), group=32)


# ---------------------------------------------------------------------- GGUF blocks
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("seed", [0, 1])
def test_from_gguf_blocks_equals_gguf_dequantize(kind, seed):
    rng = np.random.default_rng(seed)
    rows, cols = 7, 160
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 10, (rows, 1))).astype(np.float32)
    x[3, :32] = 0.0  # a zero block
    raw = gguf.quants.quantize(x, Q[kind])
    want = torch.from_numpy(gguf.quants.dequantize(raw, Q[kind]).astype(np.float32))
    q = formats.from_gguf_blocks(kind, raw, rows, cols)
    weights = {"w" + suffix: t for suffix, t in q.items()}
    formats.validate(weights)
    assert formats.format_of(weights, "w") == ("int8" if kind == "Q8_0" else "q4")
    assert formats.logical_shapes(weights) == {"w": (rows, cols)}
    got = formats.dequantize(weights, "w", torch.float32)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"


def test_from_gguf_blocks_refuses_other_types_and_widths():
    with pytest.raises(FormatError, match="Q4_K"):
        formats.from_gguf_blocks("Q4_K", np.zeros(144, np.uint8), 1, 256)
    with pytest.raises(FormatError, match="multiple"):
        formats.from_gguf_blocks("Q8_0", np.zeros(34, np.uint8), 1, 48)


# ---------------------------------------------------------------------- validate / logical_shapes
def q4_dict(rows: int = 4, cols: int = 64) -> dict[str, torch.Tensor]:
    q = formats.quantize_q4(weight(rows, cols))
    return {"w": q[""], "w.scale": q[".scale"], "w.min": q[".min"]}


def int8_dict(rows: int = 4, cols: int = 64, group: int | None = 32) -> dict[str, torch.Tensor]:
    q = formats.quantize_int8(weight(rows, cols), group)
    return {"w": q[""], "w.scale": q[".scale"]}


def test_valid_dicts_pass_and_fold_to_logical_shapes():
    mixed = {**q4_dict(4, 64), **{"v" + k[1:]: t for k, t in int8_dict(3, 96).items()},
             "norm.weight": torch.ones(64), "rope.scaling": torch.tensor(1.0)}
    formats.validate(mixed)
    assert formats.logical_shapes(mixed) == {"w": (4, 64), "v": (3, 96), "norm.weight": (64,), "rope.scaling": ()}
    assert formats.format_of(mixed, "w") == "q4" and formats.format_of(mixed, "v") == "int8"
    assert formats.format_of(mixed, "norm.weight") == "fp32"
    assert formats.compute_dtype_of(mixed) == torch.float32
    assert formats.compute_dtype_of(q4_dict()) is None  # nothing float


BAD = {
    "int8 codes of the wrong dtype": lambda: {**int8_dict(), "w": int8_dict()["w"].to(torch.uint8)},
    "float codes with a scale": lambda: {**int8_dict(), "w": torch.randn(4, 64)},
    "q4 codes of the wrong dtype": lambda: {**q4_dict(), "w": q4_dict()["w"].to(torch.int8)},
    "fp32 scales": lambda: {**int8_dict(), "w.scale": int8_dict()["w.scale"].float()},
    "1-D codes": lambda: {"w": torch.zeros(64, dtype=torch.int8), "w.scale": torch.ones(1, 1, dtype=torch.float16)},
    "scale rows differ": lambda: {**int8_dict(), "w.scale": torch.ones(3, 2, dtype=torch.float16)},
    "scale groups do not divide": lambda: {**int8_dict(), "w.scale": torch.ones(4, 3, dtype=torch.float16)},
    "q4 scale groups wrong": lambda: {**q4_dict(), "w.scale": torch.ones(4, 1, dtype=torch.float16),
                                      "w.min": torch.ones(4, 1, dtype=torch.float16)},
    "q4 min shape differs": lambda: {**q4_dict(), "w.min": torch.ones(4, 1, dtype=torch.float16)},
    "orphan scale": lambda: {"w.scale": torch.ones(4, 1, dtype=torch.float16)},
    "orphan min": lambda: {**q4_dict(), "x.min": torch.ones(4, 2, dtype=torch.float16)},
    "q4 min without a scale": lambda: {"w": q4_dict()["w"], "w.min": q4_dict()["w.min"]},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_refuses_inconsistent_tensors(case):
    with pytest.raises(FormatError):
        formats.validate(BAD[case]())


def test_mixed_float_dtypes_are_refused():
    with pytest.raises(FormatError, match="mixed"):
        formats.compute_dtype_of({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.bfloat16)})


# ---------------------------------------------------------------------- convert
def head_weights(tied: bool = True) -> dict[str, torch.Tensor]:
    embed = weight(16, 64, seed=3)
    return {"embed.weight": embed, "lm_head.weight": embed if tied else weight(16, 64, seed=4),
            "norm.weight": torch.rand(64), "norm.bias": torch.rand(64), "pos.weight": torch.randn(8, 64)}


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_convert_keeps_tied_tensors_shared(fmt):
    out = formats.convert(head_weights(tied=True), fmt, torch.bfloat16)
    suffixes = ("", ".scale") + ((".min",) if fmt == "q4" else ())
    for s in suffixes:
        assert out["lm_head.weight" + s] is out["embed.weight" + s], s
    formats.validate(out)
    untied = formats.convert(head_weights(tied=False), fmt, torch.bfloat16)
    assert untied["lm_head.weight"] is not untied["embed.weight"]


@pytest.mark.parametrize("fmt,compute", [("int8", torch.bfloat16), ("q4", torch.float32), ("q4", torch.float16),
                                         ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_convert_puts_the_rest_in_the_compute_dtype(fmt, compute):
    block = {"qkv.weight": weight(12, 64), "qkv.bias": torch.randn(12), "norm.weight": torch.rand(64),
             "rope.inv_freq": torch.rand(8), "rope.scaling": torch.tensor(1.0)}
    out = formats.convert(block, fmt, compute)
    formats.validate(out)
    assert formats.format_of(out, "qkv.weight") == fmt
    for name in ("qkv.bias", "norm.weight", "rope.inv_freq", "rope.scaling"):
        assert out[name].dtype == compute, name
    assert formats.compute_dtype_of(out) == compute
    assert formats.convert({"ids": torch.arange(3)}, fmt, compute)["ids"].dtype == torch.int64  # not a float
    assert formats.logical_shapes(out) == {n: tuple(t.shape) for n, t in block.items()}
    # the float values survive within the format's precision
    deq = formats.dequantize(out, "qkv.weight", torch.float32)
    amax = block["qkv.weight"].abs().max()
    # half a step of the coarsest row/group: int8 2*amax/127/2, q4 2*amax/15/2; floats half an ulp
    tol = {"int8": 1 / 127, "q4": 1 / 15, "bf16": 2 ** -8, "fp16": 2 ** -11}[fmt] * amax
    assert (deq - block["qkv.weight"]).abs().max() <= tol


def test_convert_of_a_matmul_weight_to_a_float_format_ignores_the_compute_dtype_for_it():
    out = formats.convert({"o.weight": weight(4, 32), "norm.weight": torch.ones(4)}, "bf16", torch.bfloat16)
    assert out["o.weight"].dtype == torch.bfloat16


def test_convert_refuses_unknown_formats():
    with pytest.raises(FormatError, match="unknown weight format"):
        formats.convert({"o.weight": weight(4, 32)}, "int4", torch.float32)


def test_per_channel_int8_stays_within_half_a_step_of_the_grouped_values():
    grouped = int8_dict(rows=9, cols=128, group=32)
    per_row = formats.per_channel_int8(grouped, "w")
    assert per_row[".scale"].shape == (9, 1) and per_row[""].dtype == torch.int8
    before = formats.dequantize(grouped, "w", torch.float32)
    after = formats.dequantize({"w": per_row[""], "w.scale": per_row[".scale"]}, "w", torch.float32)
    step = per_row[".scale"].float()
    amax = before.abs().amax(-1, keepdim=True)
    assert ((after - before).abs() <= step / 2 + amax * HALF_ULP_FP16 + 1e-7).all()
    chunked = formats.per_channel_int8(grouped, "w", chunk_rows=4)  # 4 + 4 + 1 rows
    assert torch.equal(chunked[""], per_row[""]) and torch.equal(chunked[".scale"], per_row[".scale"])


# ---------------------------------------------------------------------- --dtype
@pytest.mark.parametrize("text,want", [
    ("fp32", ("fp32", torch.float32)), ("bf16", ("bf16", torch.bfloat16)), ("fp16", ("fp16", torch.float16)),
    (" BF16 ", ("bf16", torch.bfloat16)), ("fp16:fp16", ("fp16", torch.float16)),
    ("int8", ("int8", torch.bfloat16)), ("q4", ("q4", torch.bfloat16)),
    ("int8:fp32", ("int8", torch.float32)), ("q4:fp32", ("q4", torch.float32)), ("q4:fp16", ("q4", torch.float16)),
    ("Q4:BF16", ("q4", torch.bfloat16)),
])
def test_parse_dtype_accepts(text, want):
    assert formats.parse_dtype(text) == want


@pytest.mark.parametrize("text", ["", "auto", "int4", "float32", "fp32:bf16", "bf16:fp32", "q4:int8", "int8:q4",
                                  "q4:fp64", "q4:bf16:fp32"])
def test_parse_dtype_refuses(text):
    with pytest.raises(FormatError):
        formats.parse_dtype(text)


@pytest.mark.parametrize("flags,machine,want", [
    ({"avx2", "avx512f", "avx512_bf16"}, "x86_64", "bf16"),
    ({"amx_bf16"}, "x86_64", "bf16"),
    ({"avx2", "avx512f"}, "x86_64", "fp32"),
    ({"bf16"}, "x86_64", "fp32"),  # the Arm flag's name means nothing on x86
    ({"fp", "asimd", "bf16"}, "aarch64", "bf16"),
    ({"fp", "asimd"}, "aarch64", "fp32"),
    ({"avx512_bf16"}, "aarch64", "fp32"),
    (set(), "riscv64", "fp32"),
])
def test_auto_dtype_of_a_float_checkpoint(flags, machine, want):
    assert dtype_choice.auto_dtype("dir", "/nowhere", flags=flags, machine=machine) == want


def test_auto_dtype_of_the_smollm2_q4_1_gguf(smollm2_gguf):
    assert dtype_choice.gguf_weight_kind(str(smollm2_gguf)) == "q4"
    assert dtype_choice.auto_dtype("gguf", str(smollm2_gguf), {"avx512_bf16"}, "x86_64") == "q4:bf16"
    assert dtype_choice.auto_dtype("gguf", str(smollm2_gguf), {"avx2"}, "x86_64") == "q4:fp32"
    assert dtype_choice.auto_dtype("gguf", str(smollm2_gguf), {"bf16"}, "aarch64") == "q4:bf16"


def write_gguf(path: Path, types: dict[str, Q]) -> str:
    """A GGUF holding only tensors of the given types (the header is all auto reads)."""
    w = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    for name, qtype in types.items():
        data = rng.standard_normal((256,) if name.startswith("norm") else (64, 256)).astype(np.float32)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, data.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("types,kind", [
    ({"a.weight": Q.Q8_0, "b.weight": Q.Q8_0, "norm.weight": Q.F32}, "int8"),
    ({"a.weight": Q.Q4_0, "b.weight": Q.Q4_0, "c.weight": Q.Q8_0}, "q4"),  # most bytes decide
    ({"a.weight": Q.F16, "b.weight": Q.F16}, None),
])
def test_auto_dtype_of_other_ggufs(tmp_path, types, kind):
    path = write_gguf(tmp_path / "m.gguf", types)
    assert dtype_choice.gguf_weight_kind(path) == kind
    for flags, compute in (({"avx512_bf16"}, "bf16"), (set(), "fp32")):
        want = f"{kind}:{compute}" if kind else compute
        assert dtype_choice.auto_dtype("gguf", path, flags, "x86_64") == want
