"""``--dtype auto``: the weight format and compute dtype a model runs in when none is named.

The rule, from measurements on this project's machines (docs/formats.md):
- a GGUF whose matmul weights are 4-bit (Q4_0/Q4_1) runs as ``q4``, one whose weights are
  Q8_0 as ``int8``: the file's own precision, read without a float copy where possible;
- a float checkpoint keeps its precision class: ``bf16`` where the CPU multiplies bf16
  natively (x86 with AVX512-BF16 or AMX, Arm with BF16), else ``fp32``; it is never
  quantized unasked;
- quantized weights compute in bf16 where it is native (torch's int8/int4 weight-only
  kernels are 2-18x faster than fp32 there at decode shapes), else in fp32.
The choice depends only on the file and the CPU, so an engine and a cluster on one machine
pick the same, and it is logged.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT = AUTO  # what the CLI, the daemons and the config file use when nothing is named
ENV = "EDGEHEADS_HEADNODE__DTYPE"  # the config's headnode.dtype, which `generate --local` reads too
DTYPE_HELP = ("weights and compute: auto (the file's quantization or the CPU's best float), fp32 (the exact "
              f"reference), bf16, fp16, int8, q4, or q4:fp32-style pairs (default: {ENV} or auto)")


def default_dtype() -> str:
    """The format a run that names none uses: ``EDGEHEADS_HEADNODE__DTYPE`` when set (as a head
    node's config reads it), else ``auto``."""
    import os

    return os.environ.get(ENV, "").strip().lower() or DEFAULT


def cpu_flags() -> set[str]:
    """The CPU feature flags /proc/cpuinfo lists (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def native_bf16(flags: set[str] | None = None, machine: str | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64"):
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return machine in ("aarch64", "arm64") and "bf16" in flags


def gguf_weight_kind(path: str) -> str | None:
    """``q4`` or ``int8`` when most of a GGUF's weight bytes are 4-bit or Q8_0 tensors, else None."""
    from edgeheads.headnode.gguf_direct import ggml_type_name, read_header

    sizes: dict[str, int] = {}
    for entry in read_header(path).tensors.values():
        kind = ggml_type_name(entry.ggml_type)
        sizes[kind] = sizes.get(kind, 0) + entry.nbytes
    main = max(sizes, key=sizes.__getitem__, default=None)
    return {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "int8"}.get(main or "")


def auto_dtype(source_kind: str, location: str, flags: set[str] | None = None,
               machine: str | None = None) -> str:
    """The ``--dtype`` that ``auto`` means for this model file on this CPU."""
    compute = "bf16" if native_bf16(flags, machine) else "fp32"
    if source_kind == "gguf":
        kind = gguf_weight_kind(location)
        if kind:
            return f"{kind}:{compute}"
    return compute
