"""What a worker measures about itself (pure readings, no gRPC)."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import torch

_CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_CGROUP_USAGE_FILES = ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes")


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def cgroup_available_bytes() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, then v1), or None when unlimited.
    (v1 reports an unlimited group as a huge number; anything above 2**60 counts as none.)"""
    for limit_file, usage_file in zip(_CGROUP_LIMIT_FILES, _CGROUP_USAGE_FILES):
        limit = _read_int(limit_file)
        if limit is not None and limit < 1 << 60:
            return max(0, limit - (_read_int(usage_file) or 0))
    return None


def available_memory_bytes(memory_limit_bytes: int | None = None, used_by_blocks_bytes: int = 0) -> int:
    """The lowest of psutil's available memory, the cgroup's headroom and the configured
    budget minus what the blocks already use."""
    candidates = [psutil.virtual_memory().available]
    cgroup = cgroup_available_bytes()
    if cgroup is not None:
        candidates.append(cgroup)
    if memory_limit_bytes is not None:
        candidates.append(max(0, memory_limit_bytes - used_by_blocks_bytes))
    return min(candidates)


def measure_matmul_flops(size: int = 256, seconds: float = 0.2, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of repeated (size x size) @ (size x size) matmuls for about ``seconds``."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        torch.matmul(a, b)
        n += 1
    return 2 * size ** 3 * n / elapsed
