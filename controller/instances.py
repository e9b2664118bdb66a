"""Random placement problems for tests and benchmarks (one interval, no simulation)."""

from __future__ import annotations

import numpy as np

from edgeheads.controller.problem import Cluster, Device, ModelDemand, Placement, Problem, synthetic_blocks
from edgeheads.common.spec import BlockKind, ModelShape


def random_cluster(
    rng: np.random.Generator,
    n_devices: int,
    memory_bytes: tuple[float, float] = (2e9, 8e9),
    flops_per_second: tuple[float, float] = (5e9, 5e10),
    bandwidth_bytes_per_second: tuple[float, float] = (1.25e7, 1.25e8),
    latency_seconds: tuple[float, float] = (5e-4, 5e-3),
) -> Cluster:
    """Log-normal memory and compute clipped to the given ranges (median at the geometric
    mean), uniform bandwidth and latency per ordered link: the paper's §V-B draws."""
    def lognormal(lo: float, hi: float) -> np.ndarray:
        return np.clip(rng.lognormal(np.log(np.sqrt(lo * hi)), np.log(hi / lo) / 4, n_devices), lo, hi)

    mem = lognormal(*memory_bytes)
    flops = lognormal(*flops_per_second)
    devices = [Device(f"dev{i}", float(mem[i]), float(flops[i]), float(flops[i])) for i in range(n_devices)]
    bw = rng.uniform(*bandwidth_bytes_per_second, (n_devices, n_devices))
    lat = rng.uniform(*latency_seconds, (n_devices, n_devices))
    return Cluster.from_devices(devices, bw, lat)


def random_small_problem(
    seed: int,
    n_devices: int = 3,
    n_layers: int = 2,
    kv_groups: int = 2,
    memory_use: float = 0.6,
    headnode: bool = False,
    interval_tokens: int = 1,
) -> Problem:
    """A small problem whose blocks need ``memory_use`` of the devices' total memory.

    Block figures are drawn around a ratio typical of decoder layers (FFN about 2/3 of a
    layer's weights and work); memory_use > 1 makes it infeasible by total memory.
    """
    rng = np.random.default_rng(seed)
    blocks = synthetic_blocks(n_layers, kv_groups)
    base = {BlockKind.ATTENTION: (1.0, 1.0), BlockKind.PROJECTION: (1.0, 0.8), BlockKind.FFN: (6.0, 5.0)}
    mem = np.array([base[b.kind][0] * rng.uniform(0.8, 1.25) for b in blocks]) * 1e6
    flops = np.array([base[b.kind][1] * rng.uniform(0.8, 1.25) for b in blocks]) * 1e8
    out = np.array([4096.0 if b.kind is BlockKind.ATTENTION else 8192.0 for b in blocks])
    share = rng.uniform(0.4, 1.6, n_devices)
    capacity = share / share.sum() * mem.sum() / memory_use
    speed = np.clip(rng.lognormal(np.log(1.5e10), 0.6, n_devices), 5e9, 5e10)
    devices = [Device(f"dev{i}", float(capacity[i]), float(speed[i]), float(speed[i])) for i in range(n_devices)]
    cluster = Cluster.from_devices(
        devices, rng.uniform(1.25e6, 1.25e8, (n_devices, n_devices)), rng.uniform(5e-4, 5e-3, (n_devices, n_devices))
    )
    return Problem(
        cluster=cluster,
        blocks=blocks,
        memory_bytes=mem,
        migration_bytes=mem * rng.uniform(0.9, 1.0),
        flops=flops,
        output_bytes=out,
        residual_bytes=8192.0,
        interval_tokens=interval_tokens,
        headnode=0 if headnode else None,
    )


def perturbed(problem: Problem, seed: int, compute_noise: float = 0.3, memory_scale: float = 1.0) -> Problem:
    """The same blocks on the same devices one interval later: available compute scaled by
    a random factor in [1 - compute_noise, 1], block memory scaled by ``memory_scale``."""
    rng = np.random.default_rng(seed)
    c = problem.cluster
    cluster = Cluster(
        c.names, c.memory_bytes, c.peak_flops_per_second,
        c.available_flops_per_second * rng.uniform(1 - compute_noise, 1.0, c.n_devices),
        c.bandwidth_bytes_per_second, c.latency_seconds,
    )
    return Problem(
        cluster=cluster, blocks=problem.blocks, memory_bytes=problem.memory_bytes * memory_scale,
        migration_bytes=problem.memory_bytes, flops=problem.flops, output_bytes=problem.output_bytes,
        residual_bytes=problem.residual_bytes, interval_tokens=problem.interval_tokens,
        horizon_tokens=problem.horizon_tokens, headnode=problem.headnode,
    )


def model_problem(shape: ModelShape, n_devices: int, seed: int, context_tokens: int = 128) -> Problem:
    """A real model's blocks on a random §V-B cluster, head node on device 0."""
    rng = np.random.default_rng(seed)
    return Problem.build(ModelDemand.from_shape(shape), random_cluster(rng, n_devices), context_tokens, headnode=0)


def random_placement(problem: Problem, seed: int) -> Placement:
    rng = np.random.default_rng(seed)
    return Placement.of(rng.integers(0, problem.n_devices, problem.n_blocks))
