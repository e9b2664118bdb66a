"""The controller daemon: membership, heartbeats and placement epochs over gRPC."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from edgeheads.controller.membership import ClusterState
from edgeheads.controller.service import ControllerService
from edgeheads.v1 import controller_pb2_grpc
from edgeheads.common.config import GrpcSettings
from edgeheads.common.security import SecuritySettings, install_security
from edgeheads.controller.config import ControllerSettings
from edgeheads.controller.metrics import ControllerMetrics
from edgeheads.common.server import Daemon, serve_metrics

log = logging.getLogger(__name__)


async def run_controller(settings: ControllerSettings, grpc_settings: GrpcSettings,
                         ready_file: str | None = None, security_settings: SecuritySettings | None = None) -> None:
    security = install_security(security_settings)
    state = ClusterState(settings.policy, settings.heartbeat_timeout_seconds, shuffle_moves=settings.shuffle_moves,
                         shuffle_seed=settings.shuffle_seed, replan_gate=settings.replan_gate,
                         smoothing_seconds=settings.telemetry_smoothing_seconds,
                         precopy_slowdown=settings.precopy_slowdown)
    service = ControllerService(state, heartbeat_seconds=max(0.2, settings.heartbeat_timeout_seconds / 5),
                                replan_every_tokens=settings.replan_every_tokens)
    registry = CollectorRegistry()
    service.metrics = ControllerMetrics(registry)
    serve_metrics(settings.metrics_listen, registry, ready_file)
    daemon = Daemon(settings.listen, ["edgeheads.v1.Controller"], grpc_settings, security=security)
    daemon.add(controller_pb2_grpc.add_ControllerServicer_to_server, service)
    await daemon.start(ready_file)
    tasks = [asyncio.create_task(service.sweep())]
    if settings.replan_every_seconds:
        tasks.append(asyncio.create_task(service.replan_timer(settings.replan_every_seconds)))
    await daemon.wait()
    for task in tasks:
        task.cancel()
