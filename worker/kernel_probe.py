"""Pick each quantized format's kernel by measuring it here, once per compute dtype.

Every kernel of a format computes the same product (worker/kernels.py); which is fastest
depends on the CPU and torch build (measured on an AVX512-BF16 x86: torch's int4 kernel is
4-18x faster than dequantize-then-matmul with bf16 activations, but slower with fp16 ones).
The probe times each kernel on decode-shaped matmuls (M = 1) and keeps the first kernel in
``kernels.PREFERENCE`` order that is within ``MARGIN`` of the fastest, so noise between two
close kernels cannot flip the choice between processes on one machine (an engine and a
cluster that chose differently would round differently).

``EDGEHEADS_KERNELS`` pins choices instead, e.g. ``q4=dequant,int8=int8pack``.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from edgeheads.common.formats import convert
from edgeheads.worker import kernels

log = logging.getLogger(__name__)

ENV = "EDGEHEADS_KERNELS"
MARGIN = 1.5
SHAPES = ((1536, 576), (576, 1536))  # (out, in): SmolLM2-sized decode matmuls
_done: dict[tuple[torch.dtype, str], dict[str, str]] = {}  # (dtype, device) -> {format: kernel}


def pinned(text: str | None = None) -> dict[str, str]:
    """``q4=dequant,int8=int8pack`` as {format: kernel}; UnrunnableFormat names a bad entry."""
    text = os.environ.get(ENV, "") if text is None else text
    pins: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        fmt, _, kernel = item.partition("=")
        if kernel.strip() not in kernels.KERNELS.get(fmt.strip(), {}):
            raise kernels.UnrunnableFormat(f"{ENV}: {item!r} is not FORMAT=KERNEL with a known pair; known: "
                                           + ", ".join(f"{f}={k}" for f, ks in kernels.KERNELS.items() for k in ks))
        pins[fmt.strip()] = kernel.strip()
    return pins


def time_kernel(fmt: str, kernel: str, dtype: torch.dtype, device: str = "cpu", runs: int = 25) -> float:
    """Fastest seconds of one pass over SHAPES with ``kernel`` (weights prepared beforehand):
    the minimum, because on a busy machine preemption only ever adds time (a median of a few
    millisecond-long runs was seen 500x off under load), and it takes every one of the runs
    being preempted to misjudge a kernel."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for out, cols in SHAPES:
        w = {n: t.to(device) for n, t in convert({"o.weight": torch.randn(out, cols, generator=gen) * 0.02},
                                                 fmt, dtype).items()}
        cases.append((torch.randn(1, cols, generator=gen).to(device, dtype), w))
    run = kernels.KERNELS[fmt][kernel]
    for x, w in cases:  # warm up, and let the kernel prepare its form of the weight
        run(x, w, "o.weight", None)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for x, w in cases:
            run(x, w, "o.weight", None)
        samples.append(time.perf_counter() - start)
    return min(samples)


def select_kernels(dtype: torch.dtype, device: str = "cpu", formats=None) -> dict[str, str]:
    """Choose (once per process, dtype, device and format) the kernel of each quantized format
    in ``formats`` (None: all). Returns the choices made so far for this dtype and device."""
    pins = pinned()
    done = _done.setdefault((dtype, device), {})
    for fmt, order in kernels.PREFERENCE.items():
        if fmt in done or (formats is not None and fmt not in formats):
            continue
        if fmt in pins:
            done[fmt] = pins[fmt]
        else:
            times = {}
            for kernel in order:
                try:
                    times[kernel] = time_kernel(fmt, kernel, dtype, device)
                except (RuntimeError, NotImplementedError) as err:  # this build or device lacks it
                    log.info("kernel %s for %s in %s unavailable: %s", kernel, fmt, dtype, err)
            if not times:
                continue
            fastest = min(times.values())
            done[fmt] = next(k for k in order if k in times and times[k] <= MARGIN * fastest)
            log.info("kernels for %s weights, %s compute: %s (%s)", fmt, dtype, done[fmt],
                     ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in times.items()))
        kernels.choose(fmt, done[fmt], dtype)
    return dict(done)
