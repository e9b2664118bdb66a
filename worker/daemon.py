"""The worker daemon: serve the Worker service, register with the controller, and
stream telemetry (which is also the heartbeat)."""

from __future__ import annotations

import asyncio
import logging
import random
import socket

import grpc
import torch
from prometheus_client import CollectorRegistry

from edgeheads.v1 import controller_pb2, controller_pb2_grpc, worker_pb2_grpc
from edgeheads.worker import telemetry
from edgeheads.worker.cpu_share import CpuShare
from edgeheads.worker.host import BlockHost
from edgeheads.worker.idle_sessions import sweep_idle_sessions
from edgeheads.worker.links import probe_loop
from edgeheads.worker.relay_port import RelayPort
from edgeheads.common.channels import open_channel
from edgeheads.common.config import GrpcSettings, split_host_port
from edgeheads.common.security import SecuritySettings, install_security
from edgeheads.worker.config import WorkerSettings
from edgeheads.worker.metrics import WorkerMetrics
from edgeheads.common.server import Daemon, serve_metrics
from edgeheads.worker.service import WorkerService

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.2  # the controller is retried after this, doubling up to RETRY_MAX_SECONDS
RETRY_MAX_SECONDS = 5.0


def telemetry_report(host: BlockHost, service: WorkerService, compute: telemetry.ComputeEstimate,
                     kinds: telemetry.KindRates | None = None,
                     share: CpuShare | None = None) -> controller_pb2.TelemetryReport:
    used = host.memory_used_bytes()
    cpu, load = telemetry.cpu_readings()
    throttled = telemetry.throttled()
    if share is not None:  # the calls from now on are charged as its quota made them wait (cpu_share.py)
        share.sample()
        host.cores = share.charge
    flops = compute.update(host.flops_done, host.charged_seconds)
    ceiling = telemetry.memory_limit(host.memory_limit_bytes)
    if service.metrics is not None:
        service.metrics.compute_flops.set(flops)
    return controller_pb2.TelemetryReport(
        name=host.name, memory_used_bytes=used, compute_flops=flops,
        memory_available_bytes=telemetry.memory_capacity_bytes(host.memory_limit_bytes, used),
        cpu_percent=cpu, load_1m=load, temperature_celsius=telemetry.temperature_celsius() or 0.0,
        throttling=(controller_pb2.THROTTLING_UNKNOWN if throttled is None else
                    controller_pb2.THROTTLING_ACTIVE if throttled else controller_pb2.THROTTLING_NONE),
        links=service.links.reports(),
        memory_limit_bytes=ceiling.bytes, memory_limit_source=ceiling.source,
        kind_rates=[controller_pb2.KindRate(kind=k, flops_per_second=r)
                    for k, r in sorted((kinds.update(host.kind_work) if kinds is not None else {}).items())],
        cpu_available_fraction=share.fraction if share is not None else 0.0)


async def _register_and_report(host: BlockHost, service: WorkerService, settings: WorkerSettings,
                               grpc_settings: GrpcSettings, address: str, compute: telemetry.ComputeEstimate,
                               registered: asyncio.Event, share: CpuShare) -> None:
    """Register, then stream telemetry every period; reconnect with backoff on failure (a
    controller that restarts gets every worker back within about RETRY_MAX_SECONDS)."""
    backoff = RETRY_FIRST_SECONDS
    kinds = telemetry.KindRates()  # one per process: a reconnect goes on from the rates it had
    while True:
        try:
            async with open_channel(settings.controller, grpc_settings) as ch:
                stub = controller_pb2_grpc.ControllerStub(ch)
                available = telemetry.memory_capacity_bytes(host.memory_limit_bytes)
                ceiling = telemetry.memory_limit(host.memory_limit_bytes)
                reply = await stub.Register(controller_pb2.RegisterRequest(
                    name=host.name, address=address, memory_available_bytes=available,
                    compute_flops=compute.flops_per_second, device=settings.device,
                    memory_limit_bytes=ceiling.bytes, memory_limit_source=ceiling.source), timeout=10)
                log.info("worker %s registered with controller %s", host.name, settings.controller)
                registered.set()
                backoff = RETRY_FIRST_SECONDS
                period = settings.telemetry_period_seconds or reply.heartbeat_seconds

                async def reports():
                    while True:
                        yield telemetry_report(host, service, compute, kinds, share)
                        await asyncio.sleep(period)
                await stub.Telemetry(reports())
        except grpc.aio.AioRpcError as err:
            log.warning("worker %s: controller %s: %s (%s); retrying in %.1f s", host.name, settings.controller,
                        err.code().name, err.details(), backoff)
        # jittered, so that the workers of a restarted controller do not all call at once
        await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
        backoff = min(backoff * 2, RETRY_MAX_SECONDS)


async def run_worker(settings: WorkerSettings, grpc_settings: GrpcSettings, ready_file: str | None = None,
                     security_settings: SecuritySettings | None = None) -> None:
    security = install_security(security_settings)  # every channel and link of this process uses it
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    daemon = Daemon(settings.listen, ["edgeheads.v1.Worker"], grpc_settings, security=security)
    host = BlockHost(settings.name or "", settings.memory_limit_bytes, settings.device)
    service = WorkerService(host, grpc_settings=grpc_settings, precopy_link_fraction=settings.precopy_link_fraction)
    daemon.add(worker_pb2_grpc.add_WorkerServicer_to_server, service)
    registry = CollectorRegistry()
    service.metrics = WorkerMetrics(
        registry, memory_used=host.memory_used_bytes,
        memory_available=lambda: telemetry.memory_capacity_bytes(host.memory_limit_bytes, host.memory_used_bytes()),
        blocks=lambda: len(host.blocks), sessions=lambda: len(host.sessions()),
        compute_seconds=lambda: host.compute_seconds)
    serve_metrics(settings.metrics_listen, registry, ready_file)
    # ready (ready file, systemd READY=1) only once registered with the controller, below
    bound = await daemon.start(ready=False)
    name = host.name = settings.name or f"{socket.gethostname()}-{bound.rsplit(':', 1)[1]}"
    service.relay_port = RelayPort(service.relay, grpc_settings.max_message_bytes, security)
    try:
        relay_port = await service.relay_port.start(split_host_port(settings.listen)[0], settings.relay_port)
    except OSError:
        await daemon.server.stop(0)
        raise
    daemon.on_stop.append(service.relay_port.close)
    log.info("worker %s: relay activations on TCP port %d (%s)", name, relay_port,
             "mutual TLS" if security.tls else "plaintext")
    flops = telemetry.measure_matmul_flops()
    service.metrics.compute_flops.set(flops)
    ceiling = telemetry.memory_limit(settings.memory_limit_bytes)
    log.info("worker %s: %.1f GFLOP/s measured, memory limit %.0f MiB (%s)", name, flops / 1e9,
             ceiling.bytes / (1 << 20), ceiling.source)
    registered = asyncio.Event()
    compute = telemetry.ComputeEstimate(flops)
    share = CpuShare()
    host.cores = share.charge
    task = asyncio.create_task(_register_and_report(
        host, service, settings, grpc_settings, settings.advertise_address(int(bound.rsplit(':', 1)[1])), compute,
        registered, share))
    # block calls are charged at the quota's recent throttling (worker/cpu_share.py)
    loops = [asyncio.create_task(share.watch_throttle(lambda cores: setattr(host, "cores", cores)))]
    if settings.link_probe_seconds:
        loops.append(asyncio.create_task(probe_loop(service.links, service.relay.peer_addresses,
                                                    grpc_settings, settings.link_probe_seconds)))
    if settings.session_ttl_seconds:
        loops.append(asyncio.create_task(sweep_idle_sessions(host, service.relay, settings.session_ttl_seconds)))
    if await daemon.unless_stopped(registered.wait()):
        daemon.mark_ready(ready_file, f"serving on {bound}, registered with {settings.controller} as {name}")
    await daemon.wait()
    for running in [task, *loops]:
        running.cancel()
    await service.relay.close()
