"""One gRPC channel and stub per worker, opened on first use and kept while the worker keeps
its address. A worker that comes back under the same name at another address (restarted on
another port or board) gets a new channel in place of the old one, which is closed once the
calls already on it had RETIRE_GRACE_SECONDS to end on their own (``_retire``).

Channels reconnect quickly (RECONNECT_OPTIONS): gRPC's own backoff between connection
attempts grows to two minutes by default, so a worker or controller restarted at the same
address could stay unreachable that long after it is back."""

from __future__ import annotations

import asyncio
import logging

import grpc

from edgeheads.common.channels import aio_channel
from edgeheads.common.config import GrpcSettings
from edgeheads.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)

# gRPC's reconnect backoff: the first retry after 0.2 s, growing to at most 2 s
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 2000))
# a replaced channel stays open this long for the calls already on it (longer than any unary
# call's deadline but LoadBlock's), then it is closed, cancelling what still runs
RETIRE_GRACE_SECONDS = 60.0


def daemon_channel(address: str, grpc_settings: GrpcSettings) -> grpc.aio.Channel:
    """A channel to another daemon (a worker, the controller) with the process's TLS and token."""
    return aio_channel(address, [*grpc_settings.channel_options(), *RECONNECT_OPTIONS])


class WorkerChannels:
    def __init__(self, grpc_settings: GrpcSettings) -> None:
        self.grpc_settings = grpc_settings
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.addresses: dict[str, str] = {}  # worker name -> the address its channel dials
        self.stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}  # worker name -> stub; shared, never copied
        self._closing: set[asyncio.Task] = set()  # replaced channels waiting out their grace
        self._retired: list[grpc.aio.Channel] = []  # replaced, not yet closed: close() closes them at once

    def stub(self, worker: str, address: str) -> worker_pb2_grpc.WorkerStub:
        if worker in self.stubs and self.addresses[worker] != address:
            log.warning("worker %s is at %s now (was %s): a new channel", worker, address, self.addresses[worker])
            self._retire(self.channels.pop(worker))
            del self.stubs[worker]
        if worker not in self.stubs:
            self.channels[worker] = daemon_channel(address, self.grpc_settings)
            self.addresses[worker] = address
            self.stubs[worker] = worker_pb2_grpc.WorkerStub(self.channels[worker])
        return self.stubs[worker]

    def reopen(self, worker: str) -> worker_pb2_grpc.WorkerStub:
        """A new channel to the worker's address in place of the one it has (which may be
        waiting out gRPC's backoff after failed connection attempts)."""
        self._retire(self.channels.pop(worker))
        del self.stubs[worker]
        return self.stub(worker, self.addresses[worker])

    def connect(self, addresses: dict[str, str]) -> None:
        for worker, address in addresses.items():
            self.stub(worker, address)

    def _retire(self, channel: grpc.aio.Channel) -> None:
        """Close a replaced channel, but not under the calls already on it: closing a channel
        cancels its calls, and grpc.aio raises asyncio.CancelledError in whoever awaits one,
        which reads as that task's own cancellation (a step whose client went away: its
        session ends and its Generate call is left without a status, hanging the client).
        Those calls end on their own instead (to a dead worker at once, with UNAVAILABLE,
        which every caller takes for a lost worker); the channel is closed RETIRE_GRACE_SECONDS
        later, or by close(). New calls go to the new channel meanwhile."""
        self._retired.append(channel)
        try:
            task = asyncio.get_running_loop().create_task(self._close_later(channel))
        except RuntimeError:
            return  # no event loop running: close() closes it
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_later(self, channel: grpc.aio.Channel) -> None:
        await asyncio.sleep(RETIRE_GRACE_SECONDS)
        self._retired.remove(channel)
        await channel.close()  # no await inside when given no grace: a cancel cannot stop it half-way

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for channel in [*self.channels.values(), *self._retired]:
            await channel.close()
        self._retired.clear()
