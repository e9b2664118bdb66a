"""The matmul kernels of each quantized format (worker/kernels.py) against the portable
definition ``F.linear(x, dequantize(W))``; fused attention groups and whole engines over
quantized blocks; blocks refusing weights whose formats or dtypes do not fit their shape.

Tolerances. A kernel and the reference compute the same dot products sum_k x_k w_k with
the same x and the same dequantized values w, in a different order and rounding: the
reference rounds each w to the compute dtype before the matmul, a kernel may apply the
scale after it; both round the result once. With u the compute dtype's unit roundoff and
S = sum_k |x_k w_k| (+ |bias|), each side is within (2u + K * 2^-24) * S of the exact value
(one rounding of w, one of the result; accumulation in fp32 over K terms, worst case),
so they are within twice that of each other. For fp32 compute 2u is negligible and the
K * 2^-24 term is the classical worst-case accumulation bound. Measured here: at most
~3.5u (fp32) and ~1.1u (bf16, fp16) times S, and a corrupted weight misses the bound by far.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config

from edgeheads.common import formats
from edgeheads.common.spec import BlockId, BlockKind
from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.slicing import ModelParts
from edgeheads.worker import kernel_probe, kernels
from edgeheads.worker.blocks.base import BlockShapeError
from edgeheads.worker.blocks.factory import make_block
from edgeheads.worker.executor import AttentionGroup, fusible, pack_rows
from tiny_configs import TINY_CONFIGS, VOCAB

# TINY_CONFIGS["gpt2"] has 48-wide rows, which q4's groups of 32 cannot split; this one can
GPT2_Q4 = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                     eos_token_id=2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def fresh_choices(monkeypatch):
    """No kernel chosen (each format's preferred one), no probe done, and choices made here
    undone after."""
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernel_probe, "_done", {})


@pytest.fixture
def only_kernel(monkeypatch):
    """only_kernel(fmt, name): every weight of ``fmt`` runs kernel ``name`` whatever the
    (measured, process-wide) choice is."""
    def use(fmt: str, name: str) -> None:
        kernel = kernels.KERNELS[fmt][name]
        monkeypatch.setitem(kernels.KERNELS, fmt, {k: kernel for k in kernels.KERNELS[fmt]})
    return use


def quantized(fmt: str, rows: int, cols: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A weight "w" in format int8 (per row), int8/32 (groups of 32, as GGUF Q8_0) or q4."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 2
    parts = formats.quantize_q4(w) if fmt == "q4" else formats.quantize_int8(w, 32 if fmt == "int8/32" else None)
    return {"w" + suffix: t for suffix, t in parts.items()}


def tolerance(x: torch.Tensor, weights: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """Twice the per-element bound of the module docstring."""
    w = formats.dequantize(weights, "w", torch.float64)
    s = F.linear(x.double().abs(), w.abs(), None if bias is None else bias.double().abs())
    u = torch.finfo(x.dtype).eps / 2
    return 2 * (2 * u + x.shape[-1] * 2.0 ** -24) * s


CASES = [(fmt, kernel) for fmt, base in (("int8", "int8"), ("int8/32", "int8"), ("q4", "q4"))
         for kernel in sorted(kernels.KERNELS[base])]


@pytest.mark.parametrize("fmt,kernel", CASES, ids=[f"{f}-{k}" for f, k in CASES])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("x_shape", [(5, 96), (1, 1, 96), (1, 7, 96)], ids=["2d", "decode", "prefill"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_kernel_equals_linear_of_the_dequantized_weight(fmt, kernel, dtype, x_shape, with_bias):
    dt = DTYPES[dtype]
    weights = quantized(fmt, 80, 96)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=g).to(dt)
    bias = torch.randn(80, generator=g).to(dt) if with_bias else None
    ref = F.linear(x, formats.dequantize(weights, "w", dt), bias)
    got = kernels.KERNELS[fmt.split("/")[0]][kernel](x, weights, "w", bias)
    assert got.dtype == dt and got.shape == (*x_shape[:-1], 80)
    if kernel == "dequant" or fmt == "int8/32":  # int8pack takes per-row scales only: grouped ones dequantize
        assert torch.equal(got, ref)
        return
    err = (got.double() - ref.double()).abs()
    tol = tolerance(x, weights, bias)
    assert (err <= tol).all(), f"max error / bound {(err / tol).max().item():.3f}"


@pytest.mark.parametrize("fmt,kernel", [("int8", "int8pack"), ("q4", "int4pack")])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_the_bound_catches_a_wrong_weight(fmt, kernel, dtype):
    """The tolerance has teeth: a kernel that misplaces codes (q4 nibbles) or scales (one
    row's on the next) misses it in every compute dtype."""
    dt = DTYPES[dtype]
    weights = quantized(fmt, 80, 96)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2)).to(dt)
    ref = F.linear(x, formats.dequantize(weights, "w", dt))
    wrong = dict(weights)
    if fmt == "q4":  # nibbles swapped in one group of each row: elements j and j+16 exchanged
        codes = weights["w"].clone()
        codes[:, :16] = (codes[:, :16] >> 4) | (codes[:, :16] << 4)
        wrong["w"] = codes
    else:  # each row's scale applied to the next row (new tensors: nothing prepared for them)
        wrong = {"w": weights["w"].clone(), "w.scale": weights["w.scale"].roll(1, dims=0)}
    got = kernels.KERNELS[fmt][kernel](x, wrong, "w", None)
    assert ((got.double() - ref.double()).abs() > tolerance(x, weights, None)).any()


def test_choose_validates_names_and_linear_dispatches_to_the_choice(fresh_choices):
    with pytest.raises(ValueError, match="no kernel 'int4pack' for int8"):
        kernels.choose("int8", "int4pack", torch.bfloat16)
    with pytest.raises(ValueError, match="no kernel 'dequant' for fp32"):
        kernels.choose("fp32", "dequant", torch.float32)
    with pytest.raises(ValueError, match="known"):
        kernels.choose("q4", "nonsense", torch.bfloat16)
    assert kernels.kernel_for("q4", torch.bfloat16) == kernels.PREFERENCE["q4"][0]  # refusals changed nothing
    x = torch.randn(1, 3, 96).to(torch.bfloat16)
    for fmt in ("int8", "q4"):
        weights = quantized(fmt, 64, 96)
        for name, kernel in kernels.KERNELS[fmt].items():
            kernels.choose(fmt, name, torch.bfloat16)
            other = next(k for k in kernels.KERNELS[fmt] if k != name)
            kernels.choose(fmt, other, torch.float16)  # a choice per compute dtype
            assert kernels.kernel_for(fmt, torch.bfloat16) == name
            assert torch.equal(kernels.linear(x, weights, "w"), kernel(x, weights, "w", None))
            residual = torch.randn(1, 3, 64).to(torch.bfloat16)
            assert torch.equal(kernels.residual_linear(residual, x, weights, "w", None),
                               residual + kernel(x, weights, "w", None))
    plain = {"w": torch.randn(64, 96)}
    x32 = x.float()
    assert torch.equal(kernels.linear(x32, plain, "w"), F.linear(x32, plain["w"]))


@pytest.mark.parametrize("fmt", ["int8", "int8/32", "q4"])
def test_embedding_dequantizes_only_the_rows_looked_up(fmt):
    weights = quantized(fmt, 50, 64)
    ids = torch.tensor([3, 49, 3, 0])
    got = kernels.embedding(ids, weights, "w", torch.bfloat16)
    assert torch.equal(got, formats.dequantize(weights, "w", torch.bfloat16)[ids])
    table = {"w": torch.randn(50, 64)}
    assert torch.equal(kernels.embedding(ids, table, "w", torch.float16), table["w"][ids].half())


# ---------------------------------------------------------------------- blocks over quantized weights
@pytest.fixture(scope="module")
def tiny_paths(save_tiny_model):
    return {"llama-gqa": save_tiny_model(TINY_CONFIGS["llama-gqa"], "kernels-llama-gqa", seed=0),
            "llama-tied": save_tiny_model(TINY_CONFIGS["llama-tied"], "kernels-llama-tied", seed=1),
            "gpt2": save_tiny_model(GPT2_Q4, "kernels-gpt2-64", seed=2)}


@pytest.fixture(scope="module")
def loaded(tiny_paths):
    cache = {}

    def get(name: str, dtype: str):
        if (name, dtype) not in cache:
            cache[name, dtype] = load_model(str(tiny_paths[name]), dtype, progress=False)
        return cache[name, dtype]
    return get


def attention_blocks(parts: ModelParts, layer: int) -> list:
    return [make_block(b, parts.shape, dict(w)) for b, w in parts.blocks.items()
            if b.layer == layer and b.kind is BlockKind.ATTENTION]


@pytest.mark.parametrize("dtype,kernel", [("int8", "int8pack"), ("int8", "dequant"), ("q4", "int4pack"),
                                          ("q4", "dequant"), ("int8:fp32", "int8pack"), ("q4:fp16", "int4pack")])
def test_attention_group_over_quantized_blocks_equals_each_block_alone(loaded, only_kernel, dtype, kernel):
    fmt = formats.parse_dtype(dtype)[0]
    only_kernel(fmt, kernel)
    parts = loaded("llama-gqa", dtype).parts
    assert parts.shape.n_kv_heads == 2 and parts.shape.hidden_size % 32 == 0
    fused, alone = attention_blocks(parts, 1), attention_blocks(parts, 1)
    assert formats.format_of(fused[0].weights, "qkv.weight") == fmt
    assert fusible(fused)  # convert_parts left the groups' q/k/v rows (and scales, mins) adjacent
    group = AttentionGroup(fused)
    assert set(group.qkv) == {n for n in ("qkv.weight", "qkv.weight.scale", "qkv.weight.min") if n in fused[0].weights}
    torch.manual_seed(3)
    for t in (6, 1, 1, 3, 1):  # prefill, decodes, a chunk, a decode
        x = torch.randn(1, t, parts.shape.hidden_size).to(fused[0].dtype)
        together = group.split(group.forward("s", x))
        separate = [AttentionGroup([b]).forward("s", x) for b in alone]
        for got, want in zip(together, separate):
            # the same per-row dot products; only the matmul's row count differs, which may
            # change the CPU gemm's blocking (seen: 1 fp32 ulp); bf16/fp16 came out identical
            torch.testing.assert_close(got, want)


def dequantized_parts(parts: ModelParts) -> ModelParts:
    """The same model with every quantized weight replaced by its fp32 values."""
    def floats(weights):
        return {n: formats.dequantize(weights, n, torch.float32) for n in weights if not formats.is_component(n)}
    shape = dataclasses.replace(parts.shape, weight_bytes_per_param=0.0)
    return ModelParts(shape, floats(parts.head), {b: floats(w) for b, w in parts.blocks.items()})


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied", "gpt2"])
@pytest.mark.parametrize("fmt,kernel", CASES[:2] + CASES[-2:], ids=[f"{f}-{k}" for f, k in CASES[:2] + CASES[-2:]])
def test_engine_on_quantized_parts_equals_the_engine_on_their_values(loaded, only_kernel, fresh_choices, monkeypatch,
                                                                      name, fmt, kernel):
    """Every matmul and lookup (qkv, o, gate_up/fc, down/out, embed, lm_head) goes through
    the kernels: the engine on q4/int8 weights computing in fp32 gives the logits of the
    engine on the dequantized floats."""
    monkeypatch.setenv(kernel_probe.ENV, f"{fmt}={kernel}")  # no timing: only_kernel decides anyway
    only_kernel(fmt, kernel)
    parts = loaded(name, f"{fmt}:fp32").parts
    for weights in (parts.head, *parts.blocks.values()):
        for n in weights:
            if n in formats.MATMUL_WEIGHTS:
                assert formats.format_of(weights, n) == fmt, n
    if name == "llama-tied":
        assert parts.head["lm_head.weight"] is parts.head["embed.weight"]
    quant, floats = BlockEngine(parts), BlockEngine(dequantized_parts(parts))
    prompt = [1, 104, 308, 314, 260, 229, 282, 49]
    with torch.inference_mode():
        a, b = quant.forward("s", prompt), floats.forward("s", prompt)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for token in (5, 77, 300):
            a, b = quant.forward("s", [token]), floats.forward("s", [token])
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_q4_refuses_widths_that_are_not_multiples_of_32(save_tiny_model):
    path = save_tiny_model(TINY_CONFIGS["gpt2"], "kernels-gpt2-48")  # n_embd 48
    with pytest.raises(formats.FormatError, match="groups of 32; 48 is not a multiple"):
        load_model(str(path), "q4", progress=False)


# ---------------------------------------------------------------------- blocks refusing weights
def first_attention(parts: ModelParts) -> tuple[BlockId, dict]:
    block_id = next(b for b in parts.blocks if b.kind is BlockKind.ATTENTION)
    return block_id, dict(parts.blocks[block_id])


@pytest.mark.parametrize("dtype", ["int8", "q4"])
def test_block_refuses_a_quantized_weight_with_mismatched_scales(loaded, dtype):
    parts = loaded("llama-gqa", dtype).parts
    block_id, weights = first_attention(parts)
    make_block(block_id, parts.shape, weights)  # as loaded: accepted
    scale = weights["qkv.weight.scale"]
    for bad in ({**weights, "qkv.weight.scale": scale[:-1]},  # a row short
                {**weights, "qkv.weight.scale": scale.float()},  # not fp16
                {**weights, "qkv.weight.scale": torch.cat([scale] * 3, dim=1)}):  # groups that do not fit
        with pytest.raises(BlockShapeError, match="qkv.weight"):
            make_block(block_id, parts.shape, bad)
    if dtype == "q4":
        with pytest.raises(BlockShapeError, match="qkv.weight"):
            make_block(block_id, parts.shape, {**weights, "qkv.weight.min": weights["qkv.weight.min"][:, :1]})
        # without its min, q4 codes read as int8 ones of the wrong dtype
        with pytest.raises(BlockShapeError, match="qkv.weight"):
            make_block(block_id, parts.shape, {n: t for n, t in weights.items() if n != "qkv.weight.min"})
        # codes of a model twice as wide fold to the wrong logical shape
        wide = formats.convert({"qkv.weight": torch.randn(weights["qkv.weight"].shape[0], 128)}, "q4", torch.float32)
        with pytest.raises(BlockShapeError, match=r"qkv.weight has shape \(\d+, 128\)"):
            make_block(block_id, parts.shape, {**weights, **wide})


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8", "q4"])
def test_block_refuses_float_weights_of_another_dtype(loaded, dtype):
    parts = loaded("llama-gqa", dtype).parts
    block_id, weights = first_attention(parts)
    compute = formats.parse_dtype(dtype)[1]
    assert parts.shape.dtype == formats.dtype_name(compute)
    assert make_block(block_id, parts.shape, weights).dtype == compute
    for other in ("fp32", "bf16", "fp16"):
        if DTYPES[other] == compute:
            continue
        with pytest.raises(BlockShapeError, match="the model computes in"):
            make_block(block_id, dataclasses.replace(parts.shape, dtype=other), weights)
    # one float tensor left in another dtype: mixed
    with pytest.raises(BlockShapeError, match="mixed"):
        make_block(block_id, parts.shape, {**weights, "norm.weight": weights["norm.weight"].float()
                                           if compute != torch.float32 else weights["norm.weight"].half()})


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_packed_engine_computes_what_the_unpacked_one_does(tiny_paths, fresh_choices, monkeypatch, name, dtype):
    """pack_weights rewrites the layers' q4 codes in place in the int4 kernel's layout: the logits
    are bit for bit those of an engine that keeps the codes and a packed copy, and an engine
    without it leaves its parts untouched."""
    monkeypatch.setenv(kernel_probe.ENV, "q4=int4pack")
    path = str(tiny_paths[name])
    mine, other = load_model(path, f"q4:{dtype}", progress=False), load_model(path, f"q4:{dtype}", progress=False)
    before = {b: {n: t.clone() for n, t in w.items()} for b, w in other.parts.blocks.items()}
    unpacked = BlockEngine(other.parts)
    packed = BlockEngine(mine.parts, pack_weights=True)
    assert packed.pack_q4() == 0  # done at construction, once
    changed = [n for b, w in mine.parts.blocks.items() for n in w if n + ".min" in w
               and not torch.equal(w[n], before[b][n])]
    assert changed  # the stored codes now hold another layout
    prompt = [1, 104, 308, 314, 260, 229, 282, 49]
    with torch.inference_mode():
        assert torch.equal(packed.forward("s", prompt), unpacked.forward("s", prompt))
        for token in (5, 77, 300):
            assert torch.equal(packed.forward("s", [token]), unpacked.forward("s", [token]))
    assert all(torch.equal(t, before[b][n]) for b, w in other.parts.blocks.items() for n, t in w.items())


def test_a_group_rebuilt_over_the_same_weights_keeps_their_prepared_kernel_form(loaded, only_kernel, monkeypatch):
    """A worker rebuilds its attention groups whenever any block is loaded or unloaded there
    (every block a migration brings). Over unchanged weights the int4 kernel's repacked form
    is reused; over new weights (a layer packed anew) it is made anew."""
    only_kernel("q4", "int4pack")
    parts = loaded("llama-gqa", "q4").parts
    blocks = attention_blocks(parts, 1)
    made = []
    real = kernels._int4pack
    monkeypatch.setattr(kernels, "_int4pack", lambda weights, name, dtype: made.append(name) or real(weights, name,
                                                                                                    dtype))
    x = torch.randn(1, 1, parts.shape.hidden_size).to(blocks[0].dtype)
    first = AttentionGroup(blocks).forward("a", x)
    assert made == ["qkv.weight"]
    again = AttentionGroup(blocks).forward("b", x)
    assert made == ["qkv.weight"]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    for name in [n for n in blocks[0].weights if n.startswith("qkv.")]:  # what packing a layer anew does
        for block, view in zip(blocks, pack_rows([b.weights[name] for b in blocks])):
            block.weights[name] = view
    assert fusible(blocks)
    repacked = AttentionGroup(blocks).forward("c", x)
    assert made == ["qkv.weight", "qkv.weight"]
    torch.testing.assert_close(repacked, first, rtol=0, atol=0)
    assert made[-1] and AttentionGroup(blocks[:1]).forward("d", x).shape[-1] < first.shape[-1]
    assert len(made) == 3  # one block alone is another view, with its own form
