"""Cluster membership and placement epochs, as plain state (the gRPC service wraps it)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from edgeheads.controller.spread import POLICIES, InfeasiblePlacement, Placement, WorkerCapacity
from edgeheads.worker.blocks.spec import ModelShape

log = logging.getLogger(__name__)


@dataclass
class WorkerRecord:
    name: str
    address: str
    memory_available_bytes: int
    compute_flops: float
    device: str = "cpu"
    memory_used_bytes: int = 0
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class PlacementEpoch:
    epoch: int
    placement: Placement
    addresses: dict[str, str]
    policy: str
    error: str = ""


class ClusterState:
    def __init__(self, policy: str = "spread", heartbeat_timeout_seconds: float = 5.0,
                 planning_context_tokens: int = 2048) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}; known: {sorted(POLICIES)}")
        self.policy = policy
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.planning_context_tokens = planning_context_tokens
        self.workers: dict[str, WorkerRecord] = {}
        self.shape: ModelShape | None = None
        self.model_name = ""
        self.current = PlacementEpoch(0, {}, {}, policy)

    def register(self, record: WorkerRecord) -> bool:
        """Add or refresh a worker; True when membership changed."""
        old = self.workers.get(record.name)
        self.workers[record.name] = record
        log.info("worker %s registered at %s (%d bytes available)", record.name, record.address,
                 record.memory_available_bytes)
        return old is None or old.address != record.address

    def heartbeat(self, name: str, memory_available_bytes: int, memory_used_bytes: int, compute_flops: float) -> bool:
        record = self.workers.get(name)
        if record is None:
            return False
        record.last_seen = time.monotonic()
        record.memory_available_bytes = memory_available_bytes
        record.memory_used_bytes = memory_used_bytes
        if compute_flops:
            record.compute_flops = compute_flops
        return True

    def remove(self, name: str, reason: str) -> bool:
        if self.workers.pop(name, None) is None:
            return False
        log.warning("worker %s left the cluster: %s", name, reason)
        return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        gone = [n for n, w in self.workers.items() if now - w.last_seen > self.heartbeat_timeout_seconds]
        for name in gone:
            self.remove(name, f"no heartbeat for {self.heartbeat_timeout_seconds:.0f} s")
        return gone

    def set_model(self, shape: ModelShape, name: str) -> PlacementEpoch:
        self.shape, self.model_name = shape, name
        return self.replan("model announced")

    def replan(self, reason: str) -> PlacementEpoch:
        """Compute a placement for the current members; a new epoch when it differs."""
        if self.shape is None:
            return self.current
        capacities = [WorkerCapacity(w.name, w.memory_available_bytes) for w in self.workers.values()]
        context = min(self.planning_context_tokens, self.shape.max_positions)
        try:
            placement = POLICIES[self.policy](self.shape, capacities, context)
        except InfeasiblePlacement as err:
            log.error("no feasible placement (%s): %s", reason, err)
            self.current = PlacementEpoch(self.current.epoch, self.current.placement, self.current.addresses,
                                          self.policy, error=str(err))
            return self.current
        addresses = {n: self.workers[n].address for n in set(placement.values())}
        if placement != self.current.placement or addresses != self.current.addresses or self.current.error:
            self.current = PlacementEpoch(self.current.epoch + 1, placement, addresses, self.policy)
            log.info("placement epoch %d (%s, policy %s): %d blocks on %s", self.current.epoch, reason, self.policy,
                     len(placement), ", ".join(sorted(addresses)))
        return self.current
