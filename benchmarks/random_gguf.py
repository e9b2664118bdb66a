"""Random llama-shaped GGUF files written straight in Q4_0, without any float weights.

Each matmul weight is generated as GGUF Q4_0 blocks (an fp16 scale ``d`` and 32 random 4-bit
codes ``q``; value = d * (q - 8)), tensor by tensor, and streamed into the file with
``gguf.GGUFWriter``: a 1B-parameter file costs about its largest tensor in memory (the
embedding, ~57 MB), never the 4 GB a float copy would. Norm weights are F32 ones.

The values have the spread of a real initialisation: with codes uniform on 0..15,
(q - 8) has an RMS of sqrt(21.5) = 4.64, so d = std / 4.64 gives weights of RMS ``std``
(0.02 by default); each block's d has a random sign and a magnitude drawn from
[0.5, 1.5] x that, so that the -d/2 mean of (q - 8) * d cancels over a row and the
scales are not all equal.

The tokenizer is SmolLM2's (its ``tokenizer.*`` metadata copied from the built-in model's
file), so prompts are real text and the vocabulary has its 49152 tokens.

Used by benchmarks/big_model.py and tests/test_big_model.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Q4_0_BLOCK = 18  # bytes per 32 weights: fp16 d + 16 bytes of codes
GROUP = 32
CODE_RMS = float(np.sqrt(np.mean((np.arange(16) - 8.0) ** 2)))  # 4.637: RMS of (q - 8), q uniform on 0..15
WRITER_VERSION = 1  # bump when the bytes written for a given shape and seed change


@dataclass(frozen=True)
class RandomLlama:
    """A llama shape; the vocabulary is the tokenizer's."""

    hidden: int = 2048
    layers: int = 22
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 5632
    context: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tied: bool = False
    std: float = 0.02
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
        """(GGUF name, shape in torch order (rows, cols), "Q4_0" or "F32") in file order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out = [("token_embd.weight", (vocab, h), "Q4_0")]
        for layer in range(self.layers):
            p = f"blk.{layer}."
            out += [(p + "attn_norm.weight", (h,), "F32"), (p + "attn_q.weight", (h, h), "Q4_0"),
                    (p + "attn_k.weight", (kv, h), "Q4_0"), (p + "attn_v.weight", (kv, h), "Q4_0"),
                    (p + "attn_output.weight", (h, h), "Q4_0"), (p + "ffn_norm.weight", (h,), "F32"),
                    (p + "ffn_gate.weight", (self.intermediate, h), "Q4_0"),
                    (p + "ffn_up.weight", (self.intermediate, h), "Q4_0"),
                    (p + "ffn_down.weight", (h, self.intermediate), "Q4_0")]
        out.append(("output_norm.weight", (h,), "F32"))
        if not self.tied:
            out.append(("output.weight", (vocab, h), "Q4_0"))
        return out

    def params(self, vocab: int) -> int:
        return sum(int(np.prod(shape)) for _, shape, _ in self.tensors(vocab))

    def layer_params(self) -> int:
        """Parameters of the transformer layers alone (what the workers hold)."""
        return sum(int(np.prod(shape)) for name, shape, _ in self.tensors(1) if name.startswith("blk."))


def nbytes(shape: tuple[int, ...], kind: str) -> int:
    n = int(np.prod(shape))
    return n // GROUP * Q4_0_BLOCK if kind == "Q4_0" else n * 4


def q4_0_blocks(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q4_0 data of a (rows, cols) weight: uint8 (rows, cols / 32 * 18), GGUF's layout."""
    groups = cols // GROUP
    blocks = np.empty((rows, groups, Q4_0_BLOCK), dtype=np.uint8)
    blocks[..., 2:] = np.frombuffer(rng.bytes(rows * groups * 16), dtype=np.uint8).reshape(rows, groups, 16)
    magnitude = rng.uniform(0.5, 1.5, size=(rows, groups)).astype(np.float32)
    sign = np.where(rng.integers(0, 2, size=(rows, groups), dtype=np.uint8) == 1, 1.0, -1.0).astype(np.float32)
    d = (magnitude * sign * np.float32(std / CODE_RMS)).astype(np.float16)
    blocks[..., :2] = d.view(np.uint8).reshape(rows, groups, 2)
    return blocks.reshape(rows, groups * Q4_0_BLOCK)


def tokenizer_source() -> Path:
    """The built-in SmolLM2 GGUF, whose tokenizer the random models borrow."""
    from edgeheads.headnode import model_cache

    return model_cache.fetch(model_cache.BUILTIN_MODELS["smollm2-135m"], progress=False)


def tokenizer_fields(source: Path) -> tuple[list[tuple[str, object, object, object]], int]:
    """([(key, value, GGUFValueType, array sub-type or None)] of every ``tokenizer.*`` key,
    vocabulary size) of ``source``."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields, vocab = [], 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        fields.append((key, value, main, sub))
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
    del reader
    return fields, vocab


def default_path(model: RandomLlama, folder: Path | None = None) -> Path:
    """Where ``model``'s file is cached: a name that changes with the shape, seed and writer."""
    if folder is None:
        from edgeheads.headnode import model_cache

        folder = model_cache.cache_dir() / "random"
    key = json.dumps({**dataclasses.asdict(model), "writer": WRITER_VERSION}, sort_keys=True)
    return folder / f"random-llama-{hashlib.sha256(key.encode()).hexdigest()[:12]}.gguf"


def write_random_gguf(model: RandomLlama, path: Path | None = None, progress: bool = True) -> Path:
    """Write ``model`` (random Q4_0 weights, seeded) to ``path`` (default: the cache) unless a
    complete file is already there; returns the path. Written to a temporary name first."""
    import gguf
    from tqdm import tqdm

    path = Path(path) if path is not None else default_path(model)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fields, vocab = tokenizer_fields(tokenizer_source())
    tensors = model.tensors(vocab)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(f"random-llama-{model.params(vocab) / 1e9:.2f}B")
    writer.add_block_count(model.layers)
    writer.add_context_length(model.context)
    writer.add_embedding_length(model.hidden)
    writer.add_feed_forward_length(model.intermediate)
    writer.add_head_count(model.heads)
    writer.add_head_count_kv(model.kv_heads)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_layer_norm_rms_eps(model.norm_eps)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, shape, kind in tensors:
        if kind == "Q4_0":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, kind),
                                   raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, kind))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rng = np.random.default_rng(model.seed)
        with tqdm(total=sum(nbytes(s, k) for _, s, k in tensors), unit="B", unit_scale=True, disable=not progress,
                  desc=f"writing {path.name}", file=sys.stderr) as bar:
            for name, shape, kind in tensors:  # in add_tensor_info's order: write_tensor_data pops them so
                data = q4_0_blocks(rng, *shape, model.std) if kind == "Q4_0" else np.ones(shape, dtype=np.float32)
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
