"""Reading a GGUF straight into quantized ModelParts (headnode/gguf_direct.py): weight for
weight what transformers' fp32 loading of the same file slices to, at a fraction of the memory.

Real files throughout: the built-in SmolLM2 Q4_1 and tiny llama/qwen2 GGUFs written here with
gguf.GGUFWriter (the tiny configs of tests/tiny_configs.py, weights quantized by gguf.quants)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgeheads.common import formats
from edgeheads.common.spec import BlockKind
from edgeheads.headnode import gguf_config, gguf_direct
from edgeheads.headnode.loading import ModelLoadError
from edgeheads.headnode.slicing import (ModelParts, UnsupportedModelError, rope_parameters, shape_from_config,
                                        slice_checkpoint)
from tiny_configs import TINY_CONFIGS

Q = gguf.GGMLQuantizationType

# ---------------------------------------------------------------------- writing tiny GGUFs
# HF module -> GGUF tensor (llama.cpp's standard names)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's q/k rows interleaved for llama.cpp's RoPE."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(config, state: dict[str, torch.Tensor], permute: bool) -> dict[str, torch.Tensor]:
    """An HF llama/qwen2 state dict under GGUF names, q/k rows permuted as llama.cpp does for "llama"."""
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for name, t in state.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            continue
        if permute and m[2] in ("self_attn.q_proj", "self_attn.k_proj"):
            t = llama_cpp_permute(t, config.num_attention_heads if "q_proj" in m[2] else config.num_key_value_heads)
        out[f"blk.{m[1]}.{GGUF_NAMES[m[2]]}.{m[3]}"] = t
    return out


def write_gguf(path: Path, arch: str, config, tensors: dict[str, torch.Tensor],
               types: Callable[[str], Q]) -> Path:
    """A complete GGUF transformers can load: the config's hyperparameters as metadata and each
    tensor stored as ``types(name)``."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    for name, t in tensors.items():
        qtype = types(name)
        w.add_tensor(name, gguf.quants.quantize(t.detach().float().numpy(), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_gguf(tmp_path: Path, name: str, types: Callable[[str], Q], seed: int = 0):
    """(path, HF model) for TINY_CONFIGS[name] with random weights, written as a GGUF."""
    config = TINY_CONFIGS[name]
    arch = "qwen2" if config.model_type == "qwen2" else "llama"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    tensors = gguf_tensors(config, dict(model.state_dict()), permute=arch == "llama")
    return write_gguf(tmp_path / f"{name}.gguf", arch, config, tensors, types), model


def transformers_parts(path: Path) -> ModelParts:
    """The reference: transformers' fp32 model of the file, sliced."""
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


# the mixes of types the tiny files are written in (q, k and v share one: they become one tensor)
def mixed(name: str) -> Q:
    """Q4_0 and Q8_0 matmuls, norms in F32, F16 and BF16."""
    for part, qtype in (("token_embd", Q.Q8_0), ("output.", Q.Q4_0), ("attn_q.", Q.Q4_0), ("attn_k.", Q.Q4_0),
                        ("attn_v.", Q.Q4_0), ("attn_output", Q.Q8_0), ("ffn_gate", Q.Q8_0), ("ffn_up", Q.Q8_0),
                        ("ffn_down", Q.Q4_0), ("ffn_norm", Q.F16), ("output_norm", Q.BF16)):
        if part in name and name.endswith(".weight"):
            return qtype
    return Q.F32


def q4_1(name: str) -> Q:
    return Q.Q4_1 if name.endswith(".weight") and "norm" not in name else Q.F32


def q8_0(name: str) -> Q:
    return Q.Q8_0 if name.endswith(".weight") and "norm" not in name else Q.F32


# ---------------------------------------------------------------------- checks
def assert_same_parts(mine: ModelParts, ref: ModelParts) -> None:
    """Every weight of ``mine``, dequantized to fp32, equals ``ref``'s exactly; the layout is _slice_llama's."""
    assert list(mine.blocks) == list(ref.blocks)
    drop = {"bytes_per_param", "weight_bytes_per_param"}  # the stored size is what differs
    assert ({k: v for k, v in dataclasses.asdict(mine.shape).items() if k not in drop}
            == {k: v for k, v in dataclasses.asdict(ref.shape).items() if k not in drop})
    for block, m, r in [("head", mine.head, ref.head), *((b, mine.blocks[b], ref.blocks[b]) for b in ref.blocks)]:
        formats.validate(m)
        assert formats.logical_shapes(m) == {n: tuple(t.shape) for n, t in r.items()}, block
        for name, want in r.items():
            got = formats.dequantize(m, name, torch.float32)
            assert torch.equal(got, want.float()), f"{block} {name} ({formats.format_of(m, name)}): max diff " \
                                                   f"{(got - want.float()).abs().max().item()}"
    if mine.shape.tie_embeddings:
        assert all(mine.head["lm_head.weight" + s] is t for s, t in _components(mine.head, "embed.weight").items())
    _assert_fused_qkv(mine)


def _components(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {s: weights[name + s] for s in ("", *formats.SUFFIXES) if name + s in weights}


def _assert_fused_qkv(parts: ModelParts) -> None:
    """Each of a layer's qkv.weight(.scale, .min) tensors: per-group views of one buffer, adjacent in group order."""
    for layer in range(parts.shape.n_layers):
        groups = [w for b, w in parts.blocks.items() if b.layer == layer and b.kind is BlockKind.ATTENTION]
        for suffix in _components(groups[0], "qkv.weight"):
            views = [w["qkv.weight" + suffix] for w in groups]
            assert len({v.untyped_storage().data_ptr() for v in views}) == 1
            for a, b in zip(views, views[1:]):
                assert b.data_ptr() == a.data_ptr() + a.nbytes


# ---------------------------------------------------------------------- SmolLM2 Q4_1
def test_smollm2_q4_1_equals_transformers_fp32(smollm2, smollm2_gguf):
    model, _ = smollm2
    ref = slice_checkpoint(model.config, dict(model.state_dict()))
    start = time.perf_counter()
    mine = gguf_direct.read_gguf_parts(smollm2_gguf, progress=False)
    print(f"read_gguf_parts: {time.perf_counter() - start:.2f} s")
    kinds = {formats.format_of(w, n) for w in mine.blocks.values() for n in formats.logical_shapes(w)}
    assert kinds == {"q4", "fp32"} and formats.format_of(mine.head, "embed.weight") == "int8"
    assert_same_parts(mine, ref)
    assert 0.55 < mine.shape.weight_bytes_per_param < 0.7  # Q4_1: 20 bytes per 32 weights, plus fp32 norms


def test_float_formats_of_a_gguf_are_read_directly_with_transformers_values(smollm2, smollm2_gguf):
    """fp32 (and every format converted from floats) of a llama GGUF comes from the direct reader,
    dequantized: the very values, layout and tokens transformers' GGUF reader gives, in a
    fraction of its time (about 1 s against 23 for SmolLM2)."""
    from edgeheads.headnode.loading import load_model
    from edgeheads.headnode.parts_format import convert_parts

    model, _ = smollm2
    ref = slice_checkpoint(model.config, dict(model.state_dict()))
    loaded = load_model(str(smollm2_gguf), "fp32", progress=False)
    assert type(loaded.tokenizer).__name__ == "LeanTokenizer" and loaded.dtype == "fp32"
    assert_same_parts(loaded.parts, ref)
    assert loaded.parts.shape.weight_bytes_per_param == 4.0
    bf16 = load_model(str(smollm2_gguf), "int8:bf16", progress=False)
    want = convert_parts(ref, "int8", torch.bfloat16)
    assert bf16.dtype == "int8:bf16" and bf16.parts.shape == want.shape
    for got, expected in [(bf16.parts.head, want.head), *((bf16.parts.blocks[b], w) for b, w in want.blocks.items())]:
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_config_matches_autoconfig(smollm2_gguf):
    """The config rebuilt from the lightweight header read is the one AutoConfig reads from the file."""
    header = gguf_direct.read_header(smollm2_gguf)
    mine = gguf_direct.config_from_metadata(header.metadata, header.tensors).to_dict()
    ref = AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).to_dict()
    for d in (mine, ref):
        d.pop("_name_or_path", None)
    assert mine == ref


def test_plain_llama_files_skip_transformers_config(smollm2_gguf, tmp_path):
    """lean_config reads plain llama files (the tests around check the parts equal transformers',
    shape and RoPE tensors included) and hands everything else to transformers' reader."""
    header = gguf_direct.read_header(smollm2_gguf)
    lean = gguf_config.lean_config(header.metadata, header.tensors)
    full = gguf_direct.config_from_metadata(header.metadata, header.tensors)
    assert lean is not None
    assert shape_from_config(lean, {}, torch.float32) == shape_from_config(full, {}, torch.float32)
    inv_freq, scaling = gguf_config.default_rope(lean)
    want_freq, want_scaling = rope_parameters(full)
    assert torch.equal(inv_freq, want_freq) and scaling == want_scaling
    for change in ({"general.architecture": "qwen2"}, {"general.name": "mistral"},
                   {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}):
        assert gguf_config.lean_config({**header.metadata, **change}, header.tensors) is None, change


def test_q8_0_read_per_row_equals_regrouping_the_grouped_codes(tmp_path):
    """int8_per_row reads Q8_0 tensors chunk by chunk into per-row int8: the same codes and scales as
    re-quantizing the whole grouped tensor afterwards."""
    path, _ = tiny_gguf(tmp_path, "llama-mha", q8_0)
    grouped = gguf_direct.read_gguf_parts(path, progress=False)
    per_row = gguf_direct.read_gguf_parts(path, progress=False, int8_per_row=True)
    for ref, mine in [(grouped.head, per_row.head), *((grouped.blocks[b], per_row.blocks[b]) for b in grouped.blocks)]:
        for name in [n for n in ref if n + ".scale" in ref]:
            want = formats.per_channel_int8(ref, name)
            assert mine[name + ".scale"].shape[1] == 1, name
            assert torch.equal(mine[name], want[""]) and torch.equal(mine[name + ".scale"], want[".scale"]), name
    entry = gguf_direct.read_header(path).tensors["token_embd.weight"]
    with open(path, "rb") as f:  # several chunks, the last one short
        chunked = gguf_direct.read_int8_per_row(f, entry, chunk_rows=7)
    torch.testing.assert_close(chunked[""], per_row.head["embed.weight"], rtol=0, atol=0)


# ---------------------------------------------------------------------- tiny files
@pytest.mark.parametrize("name,types", [("llama-gqa", mixed), ("llama-mqa", q4_1), ("llama-tied", mixed),
                                        ("llama-mha", q8_0), ("qwen2-qkv-bias", mixed)])
def test_tiny_gguf_equals_transformers(tmp_path, name, types):
    path, _ = tiny_gguf(tmp_path, name, types)
    assert_same_parts(gguf_direct.read_gguf_parts(path, progress=False), transformers_parts(path))
    header = gguf_direct.read_header(path)
    config = gguf_direct.config_from_metadata(header.metadata, header.tensors).to_dict()
    assert config == {**AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name).to_dict(),
                      "_name_or_path": config["_name_or_path"]}


def test_float_gguf_restores_the_hf_layout(tmp_path):
    """With F32 tensors the parts are the original model's, exactly: llama.cpp's q/k row permutation is undone."""
    path, model = tiny_gguf(tmp_path, "llama-gqa", lambda name: Q.F32)
    ref = slice_checkpoint(model.config, dict(model.state_dict()))
    ref.shape = dataclasses.replace(ref.shape, norm_eps=float(np.float32(ref.shape.norm_eps)))  # GGUF keeps an f32
    assert_same_parts(gguf_direct.read_gguf_parts(path, progress=False), ref)
    bf16 = gguf_direct.read_gguf_parts(path, torch.bfloat16, progress=False)
    assert bf16.head["norm.weight"].dtype == torch.bfloat16 and bf16.shape.bytes_per_param == 2


def test_row_maths():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of 8 rows
    assert torch.equal(llama_cpp_permute(w, 2)[gguf_direct.unpermute_rows(16, 2)], w)
    # GQA, 4 heads in 2 groups of d = 2: group g's q rows, then its k rows, then its v rows
    assert gguf_direct.qkv_rows(4, 2, 2, permuted=False).tolist() == [0, 1, 2, 3, 8, 9, 12, 13,
                                                                      4, 5, 6, 7, 10, 11, 14, 15]


# ---------------------------------------------------------------------- memory
MEASURE = """
import json, os, sys, time
import torch, transformers
if sys.argv[2] == "warm":  # the transformers modules read_gguf_parts imports (~100 MB, once per process)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    CONFIG_MAPPING["llama"]
from edgeheads.headnode.gguf_direct import read_gguf_parts

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size
base = status("VmRSS")
start = time.perf_counter()
parts = read_gguf_parts(sys.argv[1], progress=False)
print(json.dumps({"increase": status("VmHWM") - base, "seconds": time.perf_counter() - start}))
"""


def _peak_increase(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), mode], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_is_near_the_quantized_size(smollm2_gguf, require_capability):
    require_capability("/proc/self/clear_refs (Linux)", os.access("/proc/self/clear_refs", os.W_OK))
    size = smollm2_gguf.stat().st_size
    warm, cold = _peak_increase(smollm2_gguf, "warm"), _peak_increase(smollm2_gguf, "cold")
    ratio = warm["increase"] / size
    print(f"peak RSS increase / file size: {ratio:.2f} ({warm['increase'] / 2**20:.0f} MiB for a "
          f"{size / 2**20:.0f} MiB file, {warm['seconds']:.2f} s); in a fresh process, transformers' first "
          f"imports included: {cold['increase'] / size:.2f} ({cold['seconds']:.2f} s)")
    assert ratio <= 1.6


# ---------------------------------------------------------------------- bad input
def test_unsupported_tensor_type_is_named(tmp_path):
    path, _ = tiny_gguf(tmp_path, "llama-gqa", lambda n: Q.Q5_0 if re.search(r"attn_[qkv]\.", n) else mixed(n))
    with pytest.raises(UnsupportedModelError, match=r"attn_q\.weight is stored as Q5_0; .*F32, F16, BF16, "
                                                    r"Q4_0, Q4_1 and Q8_0"):
        gguf_direct.read_gguf_parts(path, progress=False)


def test_fused_tensors_stored_differently(tmp_path):
    path, _ = tiny_gguf(tmp_path, "llama-gqa", lambda n: Q.Q8_0 if "attn_v." in n else mixed(n))
    with pytest.raises(UnsupportedModelError, match=r"attn_v\.weight are stored differently \(Q4_0, Q4_0, Q8_0\)"):
        gguf_direct.read_gguf_parts(path, progress=False)


def test_non_llama_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2' is not read directly.*transformers"):
        gguf_direct.read_gguf_parts(tmp_path / "gpt2.gguf", progress=False)


@pytest.mark.parametrize("keep,message", [(0.9, "tensor .* ends at byte"), (0.003, "ends inside its header"),
                                          (0, "not a GGUF file")])
def test_truncated_file(tmp_path, keep, message):
    path, _ = tiny_gguf(tmp_path, "llama-gqa", mixed)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=f"truncated GGUF file: .*{message}" if keep else message):
        gguf_direct.read_gguf_parts(cut, progress=False)
