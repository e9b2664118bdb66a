"""The head node's long-lived link to the controller: report decoding progress (so the
controller can re-plan every N tokens) and follow its placement epochs, migrating to
each new one. Migrations run one at a time; when several epochs arrive during one,
only the newest is applied next.

Progress goes out at most every PROGRESS_INTERVAL_SECONDS, summed per epoch: a message
per decoded token would wake the controller ~10 times a second for nothing (it only
counts tokens), and on a board that wake-up competes with the step it reports."""

from __future__ import annotations

import asyncio
import logging

import grpc

from edgeheads.headnode.cluster import ClusterExecutor
from edgeheads.headnode.migrate import MigrationError, MigrationReport, migrate
from edgeheads.v1 import controller_pb2, controller_pb2_grpc
from edgeheads.worker.blocks.spec import BlockId

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 0.25


class ControllerLink:
    def __init__(self, cluster: ClusterExecutor, stub: controller_pb2_grpc.ControllerStub,
                 migration_timeout_seconds: float) -> None:
        self.cluster = cluster
        self.stub = stub
        self.migration_timeout_seconds = migration_timeout_seconds
        self.progress: list[controller_pb2.ProgressReport] = []  # not yet sent; the last one still grows
        self._progress_ready = asyncio.Event()
        self.reports: list[MigrationReport] = []
        self.failures: list[str] = []
        self._tasks: list[asyncio.Task] = []
        cluster.on_step = self._on_step

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._report_progress()), asyncio.create_task(self._follow())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_step(self, tokens: int, seconds: float, epoch: int) -> None:
        last = self.progress[-1] if self.progress else None
        if last is None or last.epoch != epoch:
            if len(self.progress) >= 1000:  # the controller is not keeping up; progress is advisory
                return
            last = controller_pb2.ProgressReport(epoch=epoch)
            self.progress.append(last)
        last.tokens += tokens
        last.step_seconds += seconds
        self._progress_ready.set()

    async def _report_progress(self) -> None:
        async def reports():
            while True:
                await self._progress_ready.wait()
                self._progress_ready.clear()
                batch, self.progress = self.progress, []
                for report in batch:
                    yield report
                await asyncio.sleep(PROGRESS_INTERVAL_SECONDS)
        while True:
            try:
                await self.stub.ReportProgress(reports())
            except grpc.aio.AioRpcError as err:
                log.warning("progress stream to the controller broke: %s; retrying", err.code().name)
            await asyncio.sleep(1.0)

    async def _follow(self) -> None:
        while True:
            try:
                current = self.cluster.epoch.number if self.cluster.epoch else 0
                latest: asyncio.Queue = asyncio.Queue()
                watch = self.stub.WatchPlacement(controller_pb2.GetPlacementRequest(after_epoch=current))

                async def pump() -> None:
                    async for reply in watch:
                        latest.put_nowait(reply)
                pumping = asyncio.create_task(pump())
                try:
                    while True:
                        reply = await latest.get()
                        while not latest.empty():  # skip to the newest epoch
                            reply = latest.get_nowait()
                        await self._apply(reply)
                finally:
                    pumping.cancel()
            except grpc.aio.AioRpcError as err:
                log.warning("placement watch broke: %s; retrying", err.code().name)
            await asyncio.sleep(1.0)

    async def _apply(self, reply: controller_pb2.PlacementReply) -> None:
        if reply.error or self.cluster.epoch is None or reply.epoch <= self.cluster.epoch.number:
            return
        placement = {BlockId.parse(a.block_id): a.worker for a in reply.assignments}
        addresses = {a.worker: a.address for a in reply.assignments}
        try:
            report = await migrate(self.cluster, reply.epoch, placement, addresses, self.migration_timeout_seconds)
            self.reports.append(report)
        except MigrationError as err:
            self.failures.append(str(err))
            log.error("%s", err)
            if self.cluster.metrics is not None:
                self.cluster.metrics.migrations.labels("abandoned").inc()
            return
        metrics = self.cluster.metrics
        if metrics is not None and report.moves:
            metrics.migrations.labels("ok").inc()
            metrics.migrated_bytes.labels("pre-copy").inc(report.precopy_bytes)
            metrics.migrated_bytes.labels("switch").inc(report.delta_bytes)
            metrics.migration_stall.observe(report.stall_seconds)
