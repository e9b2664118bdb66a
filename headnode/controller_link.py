"""The head node's long-lived link to the controller: report decoding progress (so the
controller can re-plan every N tokens) and follow its placement epochs, migrating to
each new one. Migrations run one at a time; when several epochs arrive during one,
only the newest is applied next. An epoch that leaves out a worker that is gone is
taken in by recovery instead (headnode/recovery.py), which also waits on this link's
feed of answers when a step finds a worker lost.

The controller may go away and come back (restarted, or a new process on the same
address). Meanwhile steps go on under the epoch in use, and the link retries with
backoff. A controller that comes back without the model, or behind the epoch in use,
gets the model announced again with the placement in use (``model_request``), which
it takes over, so that nothing moves (controller/service.py, SetModel)."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc

from edgeheads.headnode.cluster import ClusterExecutor, StepTiming
from edgeheads.headnode.migrate import MigrationError, MigrationReport, migrate
from edgeheads.headnode.placement_feed import PlacementAnswer, PlacementFeed
from edgeheads.headnode.recovery import Recovery
from edgeheads.v1 import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.5  # a broken stream to the controller is retried after this, doubling up to the max
RETRY_MAX_SECONDS = 5.0
ANNOUNCE_TIMEOUT_SECONDS = 60.0  # SetModel waits for the workers to register again (up to 10 s) and a plan


class ControllerLink:
    def __init__(self, cluster: ClusterExecutor, stub: controller_pb2_grpc.ControllerStub,
                 migration_timeout_seconds: float, model_name: str = "", migration_weights: str = "headnode") -> None:
        self.cluster = cluster
        self.stub = stub
        self.model_name = model_name
        self.migration_timeout_seconds = migration_timeout_seconds
        self.migration_weights = migration_weights
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

    def _on_step(self, step: StepTiming) -> None:
        try:
            self.progress.put_nowait(controller_pb2.ProgressReport(
                tokens=step.tokens, step_seconds=step.seconds, epoch=step.epoch,
                dataflow_seconds=step.dataflow_seconds, head_seconds=step.head_seconds,
                context_tokens=step.context_tokens))
        except asyncio.QueueFull:  # the controller is not keeping up; progress is advisory
            pass

    def model_request(self) -> controller_pb2.SetModelRequest:
        """The model to announce, with the placement and epoch in use once there is one."""
        request = controller_pb2.SetModelRequest(model_shape_json=json.dumps(self.cluster.shape.to_dict()),
                                                 model_name=self.model_name)
        epoch = self.cluster.epoch
        if epoch is not None:
            request.epoch = epoch.number
            request.assignments.extend(controller_pb2.Assignment(block_id=str(b), worker=w, address=epoch.addresses[w])
                                       for b, w in sorted(epoch.placement.items()))
        return request

    async def _announce_if_forgotten(self) -> None:
        """Announce the model again to a controller that does not know it, or knows an older
        epoch than the one in use: it restarted."""
        epoch = self.cluster.epoch
        if epoch is None:
            return
        status = await self.stub.Status(controller_pb2.ControllerStatusRequest(), timeout=10)
        if status.model and status.epoch >= epoch.number:
            return
        log.warning("the controller knows %s, epoch %d is in use here: announcing the model again with its "
                    "placement", f"epoch {status.epoch} of {status.model}" if status.model else "no model",
                    epoch.number)
        reply = await self.stub.SetModel(self.model_request(), timeout=ANNOUNCE_TIMEOUT_SECONDS)
        if reply.error:
            log.error("the controller found no placement after the model was announced again: %s", reply.error)
        else:
            log.info("the controller is at epoch %d after the model was announced again", reply.epoch)

    async def _report_progress(self) -> None:
        async def reports():
            while True:
                yield await self.progress.get()
        backoff = RETRY_FIRST_SECONDS
        while True:
            try:
                await self.stub.ReportProgress(reports())
                backoff = RETRY_FIRST_SECONDS
            except grpc.aio.AioRpcError as err:
                log.warning("progress stream to the controller broke: %s; retrying in %.1f s", err.code().name,
                            backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, RETRY_MAX_SECONDS)
            # progress is advisory, and a restarted controller has just planned: tokens decoded while
            # the stream was down must not make it re-plan at once
            while not self.progress.empty():
                self.progress.get_nowait()

    async def _follow(self) -> None:
        backoff = RETRY_FIRST_SECONDS
        while True:
            try:
                await self._announce_if_forgotten()
                backoff = RETRY_FIRST_SECONDS
                await self._watch()
            except (grpc.aio.AioRpcError, ConnectionError) as err:
                reason = err.code().name if isinstance(err, grpc.aio.AioRpcError) else str(err)
                log.warning("placement watch broke: %s; retrying in %.1f s", reason, backoff)
            except Exception:  # a bug must not stop this link from following the controller
                log.exception("following the controller failed; retrying in %.1f s", backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, RETRY_MAX_SECONDS)

    async def _watch(self) -> None:
        """Follow the controller's placements until the watch breaks (raises)."""
        current = self.cluster.epoch.number if self.cluster.epoch else 0
        latest: asyncio.Queue = asyncio.Queue()  # replies, then what ended the watch
        watch = self.stub.WatchPlacement(controller_pb2.GetPlacementRequest(after_epoch=current))

        async def pump() -> None:
            try:
                async for reply in watch:
                    await self.feed.publish(PlacementAnswer.from_reply(reply))
                    latest.put_nowait(reply)
                latest.put_nowait(ConnectionError("the controller ended the placement watch"))
            except grpc.aio.AioRpcError as err:
                latest.put_nowait(err)
        pumping = asyncio.create_task(pump())
        try:
            while True:
                items = [await latest.get()]
                while not latest.empty():  # skip to the newest epoch
                    items.append(latest.get_nowait())
                replies = [i for i in items if not isinstance(i, Exception)]
                if replies:
                    await self._apply(replies[-1])
                ended = [i for i in items if isinstance(i, Exception)]
                if ended:
                    raise ended[0]
        finally:
            pumping.cancel()
            watch.cancel()

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
                                   self.migration_timeout_seconds, self.migration_weights)
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
