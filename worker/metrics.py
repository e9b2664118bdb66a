"""The worker's Prometheus metrics (served by edgeheads.common.metrics.serve)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, memory_used: Callable[[], float],
                 memory_available: Callable[[], float], blocks: Callable[[], float],
                 sessions: Callable[[], float], compute_seconds: Callable[[], float]) -> None:
        Gauge("edgeheads_worker_memory_used_bytes", "Weights and K/V cache rows held", registry=registry
              ).set_function(memory_used)
        Gauge("edgeheads_worker_memory_available_bytes", "Memory the worker can give to blocks in total",
              registry=registry).set_function(memory_available)
        Gauge("edgeheads_worker_blocks", "Blocks hosted", registry=registry).set_function(blocks)
        Gauge("edgeheads_worker_sessions", "Sessions with a K/V cache here", registry=registry).set_function(sessions)
        Gauge("edgeheads_worker_compute_seconds_total", "Seconds spent running blocks", registry=registry
              ).set_function(compute_seconds)
        self.compute_flops = Gauge("edgeheads_worker_compute_flops", "Measured compute capacity (FLOP/s)",
                                   registry=registry)
        self.pulled_bytes = Counter("edgeheads_worker_pulled_bytes", "Block state pulled from other workers",
                                    registry=registry)
