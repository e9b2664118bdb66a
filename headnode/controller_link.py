"""The head node's long-lived link to the controller: report decoding progress (so the
controller can re-plan every N tokens) and follow its placement epochs, migrating to
each new one. Migrations run one at a time; when several epochs arrive during one,
only the newest is applied next. An epoch that leaves out a worker that is gone is
taken in by recovery instead (headnode/recovery.py), which also waits on this link's
feed of answers when a step finds a worker lost."""

from __future__ import annotations

import asyncio
import logging

import grpc

from edgeheads.headnode.cluster import ClusterExecutor
from edgeheads.headnode.migrate import MigrationError, MigrationReport, migrate
from edgeheads.headnode.placement_feed import PlacementAnswer, PlacementFeed
from edgeheads.headnode.recovery import Recovery
from edgeheads.v1 import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)


class ControllerLink:
    def __init__(self, cluster: ClusterExecutor, stub: controller_pb2_grpc.ControllerStub,
                 migration_timeout_seconds: float) -> None:
        self.cluster = cluster
        self.stub = stub
        self.migration_timeout_seconds = migration_timeout_seconds
        self.progress: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        self.reports: list[MigrationReport] = []
        self.failures: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self.feed = PlacementFeed()  # every answer as it arrives, for recovery
        self.recovery = Recovery(cluster, self.feed, migration_timeout_seconds)
        cluster.on_step = self._on_step
        cluster.recovery = self.recovery

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._report_progress()), asyncio.create_task(self._follow())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_step(self, tokens: int, seconds: float, epoch: int) -> None:
        try:
            self.progress.put_nowait(controller_pb2.ProgressReport(tokens=tokens, step_seconds=seconds, epoch=epoch))
        except asyncio.QueueFull:  # the controller is not keeping up; progress is advisory
            pass

    async def _report_progress(self) -> None:
        async def reports():
            while True:
                yield await self.progress.get()
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
                        await self.feed.publish(PlacementAnswer.from_reply(reply))
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
        answer = PlacementAnswer.from_reply(reply)
        try:
            if await self.recovery.on_placement(answer):
                return
        except Exception:  # a bug must not stop this link from following later epochs
            log.exception("taking in epoch %d after a lost worker failed", answer.epoch)
            return
        try:
            report = await migrate(self.cluster, answer.epoch, answer.placement, answer.addresses,
                                   self.migration_timeout_seconds)
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
