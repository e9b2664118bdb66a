"""The head node's Prometheus metrics (served by edgeheads.common.metrics.serve)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgeheads.common.metrics import PHASE_BUCKETS, STEP_BUCKETS


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
        self.recoveries = Counter("edgeheads_recoveries", "Recoveries from lost workers (ok, no_capacity: the "
                                  "rest cannot hold the model, failed)", ["result"], registry=registry)
        self.recovery_seconds = Histogram("edgeheads_recovery_seconds", "From knowing of a loss to every session "
                                          "rebuilt", buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
                                          registry=registry)
        self.recovery_bytes = Counter("edgeheads_recovery_bytes", "Bytes recoveries moved: weights shipped from "
                                      "the head node, activations of the replays", ["kind"], registry=registry)
        self.recovered_sessions = Counter("edgeheads_recovered_sessions", "Live sessions rebuilt by recoveries",
                                          registry=registry)
        self.admitted_sessions = Gauge("edgeheads_admitted_sessions", "Sessions holding a K/V reservation",
                                       registry=registry)
        self.reserved_kv_bytes = Gauge("edgeheads_reserved_kv_bytes", "K/V cache bytes the admitted sessions "
                                       "reserve on each worker", ["worker"], registry=registry)
        self.admission_refusals = Counter("edgeheads_admission_refusals", "Requests refused before they started "
                                          "(sessions: the session limit; memory: their K/V caches do not fit), and "
                                          "sessions ended after a loss because they no longer fit (evicted)",
                                          ["reason"], registry=registry)
        self.replayed_tokens = Counter("edgeheads_replayed_tokens", "Tokens recoveries fed again to rebuild caches",
                                       registry=registry)
