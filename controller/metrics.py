"""The controller's Prometheus metrics (served by edgeheads.common.metrics.serve)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.epoch = Gauge("edgeheads_controller_epoch", "The newest placement epoch", registry=registry)
        self.replans = Counter("edgeheads_controller_replans", "Re-plans, by what triggered them", ["trigger"],
                               registry=registry)
        self.memory_used = Gauge("edgeheads_controller_worker_memory_used_bytes", "As the worker last reported",
                                 ["worker"], registry=registry)
        self.memory_available = Gauge("edgeheads_controller_worker_memory_available_bytes",
                                      "As the worker last reported", ["worker"], registry=registry)
        self.compute_flops = Gauge("edgeheads_controller_worker_compute_flops", "As the worker last reported",
                                   ["worker"], registry=registry)
        self.workers = Gauge("edgeheads_controller_workers", "Registered workers", registry=registry)
