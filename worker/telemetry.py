"""What a worker measures about itself (pure readings, no gRPC)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def _parse_int(text: str) -> int | None:
    """A cgroup figure; None for "max", garbage, or v1's huge "unlimited"."""
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _read_int(path: Path) -> int | None:
    try:
        return _parse_int(path.read_text().strip())
    except OSError:
        return None


def own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> tuple[str | None, str | None]:
    """(cgroup v2 path, cgroup v1 memory path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _existing(root: Path, path: str) -> Path:
    """The cgroup's folder; in a container with its own cgroup namespace the mount is the group itself."""
    folder = root / path.lstrip("/")
    return folder if folder.is_dir() else root


def cgroup_memory(root: Path = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's memory cgroup, or None when no limit applies.

    v1: the effective (hierarchical) limit of the memory controller's group; v2: the
    lowest memory.max from the group up to the root."""
    v2, v1 = own_cgroups(proc_cgroup)
    if v1 is not None and (root / "memory").is_dir():
        folder = _existing(root / "memory", v1)
        limit = _read_int(folder / "memory.limit_in_bytes")
        try:
            for line in (folder / "memory.stat").read_text().splitlines():
                if line.startswith("hierarchical_memory_limit "):
                    hierarchical = _parse_int(line.split()[1])
                    if hierarchical is not None:
                        limit = hierarchical if limit is None else min(limit, hierarchical)
        except OSError:
            pass
        if limit is not None:
            return limit, _read_int(folder / "memory.usage_in_bytes") or 0
    if v2 is not None:
        base = root / "unified" if (root / "unified" / "cgroup.controllers").exists() else root
        folder = _existing(base, v2)
        limits = []
        walk = folder
        while True:
            value = _read_int(walk / "memory.max")
            if value is not None:
                limits.append(value)
            if walk == base or walk.parent == walk:
                break
            walk = walk.parent
        if limits:
            return min(limits), _read_int(folder / "memory.current") or 0
    return None


@dataclass(frozen=True)
class MemoryLimit:
    """The memory ceiling a worker runs under, and where it comes from."""

    bytes: int
    source: str  # "cgroup" (a container's or a systemd unit's limit), "config" (--memory-limit) or "host"


def memory_limit(memory_limit_bytes: int | None = None) -> MemoryLimit:
    """The lowest of the host's physical memory, this process's cgroup limit and the configured
    --memory-limit: inside a container limited to 1 GiB this is 1 GiB, not the host's memory."""
    candidates = [MemoryLimit(psutil.virtual_memory().total, "host")]
    cgroup = cgroup_memory()
    if cgroup is not None:
        candidates.append(MemoryLimit(cgroup[0], "cgroup"))
    if memory_limit_bytes is not None:
        candidates.append(MemoryLimit(memory_limit_bytes, "config"))
    return min(candidates, key=lambda c: c.bytes)


def memory_capacity_bytes(memory_limit_bytes: int | None = None, used_by_blocks_bytes: int = 0) -> int:
    """The bytes this worker can give to blocks and caches in total, what it holds now
    included: the lowest of psutil's available memory, the cgroup's headroom (each plus
    what the blocks already use) and the configured --memory-limit."""
    candidates = [psutil.virtual_memory().available + used_by_blocks_bytes]
    cgroup = cgroup_memory()
    if cgroup is not None:
        limit, usage = cgroup
        candidates.append(max(0, limit - usage) + used_by_blocks_bytes)
    if memory_limit_bytes is not None:
        candidates.append(memory_limit_bytes)
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


def cpu_readings() -> tuple[float, float]:
    """(CPU utilization % since the last call, 1-minute load average)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return psutil.cpu_percent(interval=None), load


def temperature_celsius(thermal_root: Path = Path("/sys/class/thermal")) -> float | None:
    """The hottest sensor: psutil's readings, else the kernel's thermal zones (Pi, Jetson)."""
    readings: list[float] = []
    try:
        for entries in (psutil.sensors_temperatures() or {}).values():
            readings += [e.current for e in entries if e.current]
    except (AttributeError, OSError):
        pass
    if not readings:
        for zone in thermal_root.glob("thermal_zone*/temp"):
            value = _read_int(zone)
            if value:
                readings.append(value / 1000)
    return max(readings) if readings else None


def throttled(pi_firmware: Path = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")) -> bool | None:
    """Whether the board is throttling now: the Raspberry Pi firmware's flags (under-voltage,
    frequency cap, thermal throttling: bits 0-3), else None when the board does not say."""
    try:
        flags = int(pi_firmware.read_text().strip(), 16)
    except (OSError, ValueError):
        return None
    return bool(flags & 0xF)


class ComputeEstimate:
    """Compute capacity: the start-up matmul figure, refined from real block timings.

    Each report takes the FLOPs and seconds the blocks ran since the last one; with at
    least ``min_seconds`` of work it moves an exponential average toward the measured
    rate, so a throttled or busy board reports less than its benchmark."""

    def __init__(self, benchmark_flops: float, weight: float = 0.3, min_seconds: float = 0.05) -> None:
        self.flops_per_second = benchmark_flops
        self.weight = weight
        self.min_seconds = min_seconds
        self._flops = 0.0
        self._seconds = 0.0

    def update(self, flops_total: float, seconds_total: float) -> float:
        d_flops, d_seconds = flops_total - self._flops, seconds_total - self._seconds
        if d_seconds >= self.min_seconds and d_flops > 0:
            measured = d_flops / d_seconds
            self.flops_per_second += self.weight * (measured - self.flops_per_second)
            self._flops, self._seconds = flops_total, seconds_total
        return self.flops_per_second


class KindRates:
    """Decode FLOP/s by block kind, as the blocks ran: per report, each kind with at least
    ``min_seconds`` of new work moves an exponential average toward its measured rate. The
    controller calibrates its cost model from these (controller/calibration.py). The default
    weight is 1, the rate since the last report: the controller predicts from the latest rates
    and plans from its own time-weighted average of them, and a second average here (weight
    0.6) kept a board that a CPU hog had just left looking slow for three more reports, which
    put the controller's predictions 15-35% above the measured token times after every change."""

    def __init__(self, weight: float = 1.0, min_seconds: float = 0.02) -> None:
        self.weight = weight
        self.min_seconds = min_seconds
        self.rates: dict[str, float] = {}
        self._seen: dict[str, tuple[float, float]] = {}

    def update(self, kind_work: dict[str, list[float]]) -> dict[str, float]:
        for kind, (flops_total, seconds_total) in kind_work.items():
            flops0, seconds0 = self._seen.get(kind, (0.0, 0.0))
            d_flops, d_seconds = flops_total - flops0, seconds_total - seconds0
            if d_seconds >= self.min_seconds and d_flops > 0:
                measured = d_flops / d_seconds
                old = self.rates.get(kind)
                self.rates[kind] = measured if old is None else old + self.weight * (measured - old)
                self._seen[kind] = (flops_total, seconds_total)
        return dict(self.rates)
