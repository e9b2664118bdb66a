"""The relay dataflow: the head node out of the data path.

Per epoch, headnode/relay_plan.py turns the StepPlan into one program per worker, and
a RelayDriver (headnode/relay_driver.py) installs them and keeps one Drive connection
per worker. Per step the head node sends x0 and waits for the final value; the workers
pass every other value to each other. Relay sessions keep nothing on the head node
but their position (in the SessionTable).
"""

from __future__ import annotations

import asyncio
import logging

import torch

from edgeheads.common.wire import tensor_from_proto, tensor_to_proto
from edgeheads.headnode.dataflow import StepStats
from edgeheads.headnode.relay_driver import RelayDriver
from edgeheads.headnode.relay_plan import RelayPlan, relay_plan
from edgeheads.headnode.sessions import Epoch
from edgeheads.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)

TRANSPORTS = ("tcp", "grpc")


class RelayDataflow:
    label = "relay"

    def __init__(self, stubs: dict[str, worker_pb2_grpc.WorkerStub], stats: StepStats, step_timeout_seconds: float,
                 transport: str = "tcp", max_message_bytes: int = 64 << 20) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"relay transport must be 'tcp' or 'grpc', not {transport!r}")
        self.name = f"relay/{transport}"
        self.stubs = stubs
        self.stats = stats
        self.step_timeout_seconds = step_timeout_seconds
        self.transport = transport
        self.max_message_bytes = max_message_bytes
        self.epoch: Epoch | None = None
        self.driver: RelayDriver | None = None
        self._reopening = asyncio.Lock()

    async def _started(self, number: int, plan: RelayPlan, addresses: dict[str, str]) -> RelayDriver:
        driver = RelayDriver(number, plan, self.stubs, self.step_timeout_seconds, self.transport,
                             self.max_message_bytes)
        try:
            await driver.start(addresses)
        except BaseException:
            await driver.close()
            raise
        return driver

    async def switch(self, epoch: Epoch) -> None:
        driver = await self._started(epoch.number, relay_plan(epoch.plan), epoch.addresses)
        old, self.driver, self.epoch = self.driver, driver, epoch
        if old is not None:
            await old.close()

    async def _reopen(self) -> None:
        """A drive of this epoch broke (its steps in flight failed): install the epoch's
        programs again over fresh drives. If that fails too, this step fails and the next
        one tries again, until the controller publishes a new epoch."""
        async with self._reopening:
            old = self.driver
            if old is None or not old.broken or self.epoch is None:
                return
            log.warning("epoch %d: reopening the relay drives (%s)", old.epoch, old.broken)
            self.driver = await self._started(old.epoch, old.plan, self.epoch.addresses)
            await old.close()

    async def step(self, session: str, position: int, x0: torch.Tensor, reserve_tokens: int = 0) -> torch.Tensor:
        assert self.driver is not None, "no epoch yet"
        if self.driver.broken:
            await self._reopen()
        driver = self.driver
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        final, path_compute_seconds = await driver.step(session, position, tensor_to_proto(x0), reserve_tokens)
        self.stats.path(self.label, driver.plan.phases, loop.time() - t0, path_compute_seconds)
        return tensor_from_proto(final, driver.plan.final)

    async def forget(self, session: str) -> None:
        pass  # the drives are the epoch's, shared by every session

    async def close(self) -> None:
        if self.driver is not None:
            await self.driver.close()
