"""The head node daemon: load the model, wait for workers, get a placement from the
controller, ship the blocks, and serve Generate."""

from __future__ import annotations

import asyncio
import logging

import grpc
from prometheus_client import CollectorRegistry

from edgeheads.headnode.cluster import ClusterExecutor
from edgeheads.headnode.controller_link import ControllerLink
from edgeheads.headnode.errors import StartupError
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.service import HeadnodeService
from edgeheads.v1 import controller_pb2, controller_pb2_grpc, headnode_pb2_grpc
from edgeheads.common.spec import BlockId
from edgeheads.headnode.channels import daemon_channel
from edgeheads.common.config import GrpcSettings
from edgeheads.common.security import SecuritySettings, install_security
from edgeheads.headnode.config import HeadnodeSettings
from edgeheads.headnode.metrics import HeadnodeMetrics
from edgeheads.common.server import Daemon, serve_metrics, write_ready_file

log = logging.getLogger(__name__)


async def wait_for_workers(stub: controller_pb2_grpc.ControllerStub, count: int, timeout_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while True:
        try:
            workers = (await stub.ListWorkers(controller_pb2.ListWorkersRequest(), timeout=5)).workers
            if len(workers) >= count:
                return
            have = len(workers)
        except grpc.aio.AioRpcError as err:
            have = f"controller unreachable ({err.code().name})"
        if loop.time() > deadline:
            raise StartupError(f"waited {timeout_seconds:.0f} s for {count} workers; have {have}")
        await asyncio.sleep(0.2)


async def run_headnode(settings: HeadnodeSettings, grpc_settings: GrpcSettings, ready_file: str | None = None,
                       progress: bool = True, security_settings: SecuritySettings | None = None) -> None:
    # first, so that a bad file fails before the model loads; the workers' channels and the
    # relay drives (headnode.cluster) use it as the process's security
    security = install_security(security_settings)
    registry = CollectorRegistry()
    metrics = HeadnodeMetrics(registry)
    serve_metrics(settings.metrics_listen, registry, ready_file)
    model = await asyncio.to_thread(load_model, settings.model, settings.dtype, progress)
    cluster = ClusterExecutor(model.parts, grpc_settings, dataflow=settings.dataflow,
                              step_timeout_seconds=settings.step_timeout_seconds, metrics=metrics,
                              relay_transport=settings.relay_transport, max_sessions=settings.max_sessions)
    # the controller may restart: the channel reconnects quickly, and the link announces the model again
    async with daemon_channel(settings.controller, grpc_settings) as channel:
        controller = controller_pb2_grpc.ControllerStub(channel)
        link = ControllerLink(cluster, controller, settings.migration_timeout_seconds, model.name,
                              settings.migration_weights)
        await wait_for_workers(controller, settings.min_workers, settings.worker_wait_seconds)
        reply = await controller.SetModel(link.model_request())
        if reply.error:
            raise StartupError(f"controller found no placement: {reply.error}")
        placement = {BlockId.parse(a.block_id): a.worker for a in reply.assignments}
        addresses = {a.worker: a.address for a in reply.assignments}
        await cluster.apply_placement(reply.epoch, placement, addresses, progress=progress)
        link.start()
        daemon = Daemon(settings.listen, ["edgeheads.v1.Headnode"], grpc_settings, security=security)
        daemon.add(headnode_pb2_grpc.add_HeadnodeServicer_to_server, HeadnodeService(model, cluster, link))
        if settings.http_listen is not None:  # the OpenAI-compatible API: the same generation loop
            from edgeheads.headnode.http_api import HttpServer, OpenAIApi, exposure_warning

            http = HttpServer(settings.http_listen, OpenAIApi(model, cluster, security.token).app())
            if warning := exposure_warning(settings.http_listen, security.token):
                log.warning("%s", warning)
            # written before the ready file, like the metrics address: launchers read both then
            address = await http.start()
            if ready_file:
                write_ready_file(f"{ready_file}.http", address)
            daemon.on_stop.append(http.stop)
        daemon.on_stop += [link.close, cluster.close]
        await daemon.start(ready_file)
        await daemon.wait()
