"""The devices of a placement problem and the links between them, as numpy arrays
(see controller/problem.py for the whole problem and its index conventions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Device:
    """One worker as the controller sees it during an interval."""

    name: str
    memory_bytes: float
    """Memory available for blocks (weights and K/V caches)."""
    peak_flops_per_second: float
    available_flops_per_second: float
    """What is left after background load; the cost model uses this one."""


@dataclass(frozen=True, eq=False)
class Cluster:
    """Devices and the links between them, as arrays.

    ``bandwidth_bytes_per_second[i, j]`` and ``latency_seconds[i, j]`` describe the
    ordered link i -> j. The diagonal is ignored (a device talks to itself for free).
    """

    names: tuple[str, ...]
    memory_bytes: np.ndarray  # (n,)
    peak_flops_per_second: np.ndarray  # (n,)
    available_flops_per_second: np.ndarray  # (n,)
    bandwidth_bytes_per_second: np.ndarray  # (n, n)
    latency_seconds: np.ndarray  # (n, n)
    migration_latency_seconds: np.ndarray | None = None
    """(n, n) the latency a migration pays per block, when it is not ``latency_seconds``: a
    calibrated cluster adds the measured per-message cost to every link's latency, which a
    migration, one stream from each source, does not pay per block (controller/calibration.py)."""

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0:
            raise ValueError("a cluster needs at least one device")
        if len(set(self.names)) != n:
            raise ValueError(f"device names are not unique: {self.names}")
        for attr in ("memory_bytes", "peak_flops_per_second", "available_flops_per_second"):
            if getattr(self, attr).shape != (n,):
                raise ValueError(f"{attr} must have shape ({n},)")
        for attr in ("bandwidth_bytes_per_second", "latency_seconds", "migration_latency_seconds"):
            if getattr(self, attr) is not None and getattr(self, attr).shape != (n, n):
                raise ValueError(f"{attr} must have shape ({n}, {n})")
        off = ~np.eye(n, dtype=bool)
        if np.any(self.bandwidth_bytes_per_second[off] <= 0):
            raise ValueError("every link needs a positive bandwidth_bytes_per_second")
        if np.any(self.latency_seconds[off] < 0):
            raise ValueError("link latency_seconds cannot be negative")
        if np.any(self.available_flops_per_second <= 0):
            raise ValueError("every device needs positive available_flops_per_second")
        if np.any(self.memory_bytes < 0):
            raise ValueError("memory_bytes cannot be negative")

    @classmethod
    def from_devices(
        cls,
        devices: Sequence[Device],
        bandwidth_bytes_per_second: np.ndarray | float,
        latency_seconds: np.ndarray | float = 0.0,
    ) -> "Cluster":
        """Build from Device records; scalars mean every link is the same."""
        n = len(devices)
        bw = np.broadcast_to(np.asarray(bandwidth_bytes_per_second, dtype=float), (n, n)).copy()
        lat = np.broadcast_to(np.asarray(latency_seconds, dtype=float), (n, n)).copy()
        return cls(
            names=tuple(d.name for d in devices),
            memory_bytes=np.array([d.memory_bytes for d in devices], dtype=float),
            peak_flops_per_second=np.array([d.peak_flops_per_second for d in devices], dtype=float),
            available_flops_per_second=np.array([d.available_flops_per_second for d in devices], dtype=float),
            bandwidth_bytes_per_second=bw,
            latency_seconds=lat,
        )

    @property
    def n_devices(self) -> int:
        return len(self.names)

    def devices(self) -> list[Device]:
        return [
            Device(name, float(m), float(p), float(a))
            for name, m, p, a in zip(
                self.names, self.memory_bytes, self.peak_flops_per_second, self.available_flops_per_second
            )
        ]


__all__ = ["Cluster", "Device"]
