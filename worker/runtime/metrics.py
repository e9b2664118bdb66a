"""Prometheus metrics: each daemon has its own registry and serves it over HTTP on its
own port (``metrics_listen``). The metric objects live here, one class per daemon, so
the code that updates them only calls ``observe``/``inc``/``set``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edgeheads.worker.runtime.config import split_host_port

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
PHASE_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5)


def serve(listen: str | None, registry: CollectorRegistry) -> str | None:
    """Start the HTTP exporter; the bound HOST:PORT (port 0 picks a free one), or None when off."""
    if not listen:
        return None
    host, port = split_host_port(listen)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {listen}: {err} (set metrics_listen to another port, "
                      "or to null to turn metrics off)") from None
    bound = f"{host}:{server.server_port}"
    log.info("metrics on http://%s/metrics", bound)
    return bound


class HeadnodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.step = Histogram("edgeheads_step_seconds", "Wall time of one forward step (all sessions)",
                              ["dataflow"], buckets=STEP_BUCKETS, registry=registry)
        self.phase = Histogram("edgeheads_phase_seconds", "Time of one network phase of a step (in relay "
                               "dataflow: the step time divided by its phases)", ["dataflow"],
                               buckets=PHASE_BUCKETS, registry=registry)
        self.step_compute = Histogram("edgeheads_step_compute_seconds", "Worker compute on a step's critical path",
                                      buckets=STEP_BUCKETS, registry=registry)
        self.step_network = Histogram("edgeheads_step_network_seconds", "A step's time not spent computing on "
                                      "its critical path (network and serialization)", buckets=STEP_BUCKETS,
                                      registry=registry)
        self.tokens = Counter("edgeheads_tokens", "Tokens fed through the model (prompt and generated)",
                              registry=registry)
        self.epoch = Gauge("edgeheads_epoch", "The placement epoch in use", registry=registry)
        self.migrations = Counter("edgeheads_migrations", "Migrations to a new epoch", ["result"], registry=registry)
        self.migrated_bytes = Counter("edgeheads_migrated_bytes", "Bytes moved between workers by migrations",
                                      ["stage"], registry=registry)
        self.migration_stall = Histogram("edgeheads_migration_stall_seconds", "How long a switch held steps back",
                                         buckets=STEP_BUCKETS, registry=registry)


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
