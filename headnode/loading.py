"""Turn a model specifier into a loaded, sliced model.

A specifier is one of:
- a built-in alias (``smollm2-135m``, the default);
- a path to a ``.gguf`` file, or a directory holding exactly one ``.gguf``;
- a local transformers directory (config.json, safetensors, tokenizer);
- a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs internet).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeheads.common.formats import parse_dtype
from edgeheads.headnode import model_cache
from edgeheads.headnode.dtype_choice import AUTO, auto_dtype, default_dtype
from edgeheads.headnode.parts_format import convert_parts, float_parts
from edgeheads.headnode.slicing import ModelParts, UnsupportedModelError, slice_checkpoint, unsupported_message
from edgeheads.common.spec import SUPPORTED_ARCHITECTURES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(RuntimeError):
    """The model specifier names nothing loadable; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub"
    location: str  # file path, directory path or hub id
    name: str  # what the user asked for

    def transformers_args(self) -> tuple[str, dict[str, Any]]:
        if self.kind == "gguf":
            path = Path(self.location)
            return str(path.parent), {"gguf_file": path.name}
        return self.location, {}


def resolve(spec: str, progress: bool = True) -> ModelSource:
    """Map a specifier to a source, fetching the built-in model if that is what it names."""
    if spec in model_cache.BUILTIN_MODELS:
        return ModelSource("gguf", str(model_cache.fetch(model_cache.BUILTIN_MODELS[spec], progress)), spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{spec}: a model file must be .gguf (or pass a transformers directory)")
        return ModelSource("gguf", str(path.resolve()), spec)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("dir", str(path.resolve()), spec)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0].resolve()), spec)
        raise ModelLoadError(f"{spec}: directory has no config.json and {len(ggufs)} .gguf files; "
                             "expected a transformers directory or exactly one .gguf")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and not os.path.isabs(spec):
        return ModelSource("hub", spec, spec)
    raise ModelLoadError(f"model {spec!r} not found: not a local path, not a hub id (org/name), and not a "
                         f"built-in alias (built-in: {', '.join(model_cache.BUILTIN_MODELS)})")


def load_transformers(source: ModelSource, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The transformers model (eval mode) and tokenizer for a source: the numerics oracle,
    and the head node's reader of every checkpoint format."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location, kwargs = source.transformers_args()
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        hint = " (hub ids need internet access)" if source.kind == "hub" else ""
        raise ModelLoadError(f"cannot read the model config of {source.name!r}{hint}: {err}") from err
    if getattr(config, "model_type", None) not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(unsupported_message(getattr(config, "model_type", "?")))
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load {source.name!r}: {err}") from err
    return model, tokenizer


@dataclass
class LoadedModel:
    """A sliced model plus what generation needs around it."""

    name: str
    parts: ModelParts
    tokenizer: Any
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: str = "fp32"  # the --dtype it was loaded as (``auto`` resolved)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def from_transformers(name: str, model: Any, tokenizer: Any) -> LoadedModel:
    parts = slice_checkpoint(model.config, dict(model.state_dict()))
    return LoadedModel(name, parts, tokenizer, eos_ids(model, tokenizer))


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = None, progress: bool = True) -> LoadedModel:
    """Load and slice a model with its weights in ``dtype``: a format name or pair as
    ``formats.parse_dtype`` reads it (``fp32``, ``bf16``, ``fp16``, ``int8``, ``q4``,
    ``q4:fp32``, ...), ``auto`` (headnode/dtype_choice.py) or a torch float dtype; None: the
    default (``EDGEHEADS_HEADNODE__DTYPE``, else ``auto``), as the CLI and the head node use.
    A llama-family GGUF is read by headnode/gguf_direct.py: ``q4`` keeps its quantized tensors
    as stored, any other format dequantizes them (the values transformers' GGUF reader gives, in
    a tenth of its time) and converts. Every other source loads floats through transformers
    and converts them."""
    source = resolve(spec, progress)
    if dtype is None:
        dtype = default_dtype()
    if dtype == AUTO:
        dtype = auto_dtype(source.kind, source.location)
        log.info("--dtype auto: %s runs as %s on this CPU", spec, dtype)
        if progress:  # said where the progress bars go: a person is watching
            print(f"--dtype auto: {spec} runs as {dtype} on this CPU (docs/formats.md)", file=sys.stderr)
    fmt, compute = parse_dtype(dtype) if isinstance(dtype, str) else (None, dtype)
    log.info("loading model %s from %s (%s) as %s", spec, source.location, source.kind, dtype)
    if source.kind == "gguf":
        floats = torch.float32 if fmt else compute
        direct = load_gguf_direct(spec, source, compute if fmt == "q4" else floats, progress,
                                  int8_per_row=fmt == "q4")
        if direct is not None and fmt == "q4":
            return direct
        if direct is not None:
            direct.parts = float_parts(direct.parts, floats)
            release_free_memory()
            if fmt and fmt != "fp32":
                direct.parts = convert_parts(direct.parts, fmt, compute)
                release_free_memory()
            direct.dtype = dtype if isinstance(dtype, str) else direct.parts.shape.dtype
            return direct
    model, tokenizer = load_transformers(source, torch.float32 if fmt else compute)
    loaded = from_transformers(spec, model, tokenizer)
    loaded.dtype = dtype if isinstance(dtype, str) else loaded.parts.shape.dtype
    if fmt and fmt != "fp32":
        loaded.parts = convert_parts(loaded.parts, fmt, compute)
        del model
        release_free_memory()
    return loaded


def load_gguf_direct(spec: str, source: ModelSource, compute: torch.dtype, progress: bool,
                     int8_per_row: bool = True) -> LoadedModel | None:
    """A GGUF's quantized tensors kept as stored (Q4_0/Q4_1 as q4); Q8_0 tensors re-quantized
    per row for the fast int8 kernel with ``int8_per_row``, else kept in groups of 32 as stored.
    None when the file is not one gguf_direct reads (then the transformers path takes it)."""
    from edgeheads.headnode.gguf_direct import ARCHITECTURES, read_gguf_parts, read_header

    if read_header(source.location).metadata.get("general.architecture") not in ARCHITECTURES:
        log.info("%s: GGUF architecture not read directly; converting from floats instead", spec)
        return None
    # the tokenizer first: parsing it leaves ~30 MiB of freed heap, handed back before the weights arrive
    tokenizer = gguf_tokenizer(source)
    release_free_memory()
    try:
        parts = read_gguf_parts(source.location, compute, progress, int8_per_row=int8_per_row)
    except UnsupportedModelError as err:
        log.info("%s: %s; converting from floats instead", spec, err)
        return None
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    release_free_memory()
    return LoadedModel(spec, parts, tokenizer, eos, dtype="q4:" + parts.shape.dtype)


def gguf_tokenizer(source: ModelSource) -> Any:
    """A GGUF's tokenizer, kept beside the model cache as a tokenizer.json once built and then
    served by ``LeanTokenizer`` (the ``tokenizers`` library alone). transformers builds it from
    the GGUF through the gguf reader, which holds every vocabulary string as a numpy view
    (+174 MB peak for SmolLM2's 49k tokens), and its own wrapper costs ~55 MiB more than
    LeanTokenizer's +35."""
    from edgeheads.headnode.lean_tokenizer import LeanTokenizer, supported

    path = Path(source.location)
    stat = path.stat()
    saved = model_cache.cache_dir() / "tokenizers" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (saved / "tokenizer.json").is_file():
        try:
            return LeanTokenizer(saved) if supported(saved) else _auto_tokenizer(str(saved), {})
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception for a bad file
            log.warning("saved tokenizer %s unreadable (%s); rebuilding it from the GGUF", saved, err)

    location, kwargs = source.transformers_args()
    tokenizer = _auto_tokenizer(location, kwargs)
    try:
        tokenizer.save_pretrained(str(saved))
    except OSError as err:  # a read-only cache: build it again next time
        log.info("cannot keep the tokenizer at %s: %s", saved, err)
        return tokenizer
    return LeanTokenizer(saved) if supported(saved) else tokenizer


def _auto_tokenizer(location: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, **kwargs)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim), after loading made and
    dropped temporaries; a no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
