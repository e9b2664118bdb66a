"""Outgoing relay links: one long-lived Forward stream to each peer worker.

Each peer has a queue and one sender task, so the worker never waits on the network
while it computes, and writes to one stream never overlap. A failed send is reported
through ``on_error`` with the batch that could not go, so the head node learns which
session broke and why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.worker.runtime.config import GrpcSettings

log = logging.getLogger(__name__)

ErrorHandler = Callable[[worker_pb2.ValueBatch, str], None]


class PeerLinks:
    def __init__(self, grpc_settings: GrpcSettings, on_error: ErrorHandler) -> None:
        self.grpc_settings = grpc_settings
        self.on_error = on_error
        self.addresses: dict[str, str] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def update(self, addresses: dict[str, str]) -> None:
        """New peer addresses (from a program); a peer whose address changed gets a new link."""
        for name, address in addresses.items():
            if self.addresses.get(name) not in (None, address):
                self._close_link(name)
            self.addresses[name] = address

    def send(self, peer: str, batch: worker_pb2.ValueBatch) -> None:
        if peer not in self.addresses:
            self.on_error(batch, f"no address for peer worker {peer!r}")
            return
        if peer not in self._queues:
            self._queues[peer] = asyncio.Queue()
            self._tasks[peer] = asyncio.create_task(self._pump(peer, self._queues[peer]))
        self._queues[peer].put_nowait(batch)

    async def _pump(self, peer: str, queue: asyncio.Queue) -> None:
        channel = grpc.aio.insecure_channel(self.addresses[peer], options=self.grpc_settings.channel_options())
        self._channels[peer] = channel
        call = worker_pb2_grpc.WorkerStub(channel).Forward()
        batch = None
        try:
            while True:
                batch = await queue.get()
                await call.write(batch)
                batch = None
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the stream broke: report this batch and everything queued behind it
            reason = getattr(err, "code", lambda: None)()
            message = f"relay to peer {peer} at {self.addresses[peer]} failed: {reason.name if reason else err}"
            log.warning(message)
            failed = [batch] if batch is not None else []
            while not queue.empty():
                failed.append(queue.get_nowait())
            self._queues.pop(peer, None)
            self._tasks.pop(peer, None)
            self._channels.pop(peer, None)
            await channel.close()
            for b in failed:
                self.on_error(b, message)

    def _close_link(self, peer: str) -> None:
        task = self._tasks.pop(peer, None)
        if task is not None:
            task.cancel()
        self._queues.pop(peer, None)
        channel = self._channels.pop(peer, None)
        if channel is not None:
            asyncio.ensure_future(channel.close())

    async def close(self) -> None:
        for peer in list(self._tasks):
            self._close_link(peer)
