"""Outgoing relay links: one long-lived link to each peer worker, over the epoch's relay
transport: a gRPC Forward stream, or a TCP connection to the peer's relay port.

The worker never waits on the network while it computes: ``send`` only queues or
writes. Writes to one link never interleave. A link that breaks reports, through
``on_error``, the batches it could not send, so the head node learns which session
broke and why. A TCP link cannot know which written batches the peer never read, so
it also reports the epoch of the last one without a session: the head node then fails
that epoch's steps in flight at once. The next send opens a new link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.common.config import GrpcSettings
from edgeheads.common.relay_wire import Kind, RelayConnection, parse

log = logging.getLogger(__name__)

ErrorHandler = Callable[[worker_pb2.ValueBatch, str], None]


class _Link:
    def __init__(self, links: PeerLinks, peer: str) -> None:
        self.links = links
        self.peer = peer
        self.address = links.addresses[peer]
        self.queue: list[worker_pb2.ValueBatch] = []
        self.task = asyncio.create_task(self.run())

    def close(self) -> None:
        self.task.cancel()

    def _broken(self, reason: str, failed: list[worker_pb2.ValueBatch], lost_epoch: int | None = None) -> None:
        """Report the batches that did not go; with ``lost_epoch``, also that batches already
        written may be lost (a report without a session: the head node fails the epoch's
        steps in flight)."""
        message = f"relay to peer {self.peer} at {self.address} failed: {reason}"
        log.warning(message)
        self.links._drop(self)
        for batch in failed:
            self.links.on_error(batch, message)
        if lost_epoch is not None:
            self.links.on_error(worker_pb2.ValueBatch(epoch=lost_epoch), message)


class _GrpcLink(_Link):
    """A Forward stream fed by one pump task."""

    def __init__(self, links: PeerLinks, peer: str) -> None:
        self.ready = asyncio.Event()
        super().__init__(links, peer)

    def send(self, batch: worker_pb2.ValueBatch) -> None:
        self.queue.append(batch)
        self.ready.set()

    async def run(self) -> None:
        settings = self.links.grpc_settings
        async with grpc.aio.insecure_channel(self.address, options=settings.channel_options()) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Forward()
            batch = None
            try:
                while True:
                    await self.ready.wait()
                    self.ready.clear()
                    while self.queue:
                        batch = self.queue.pop(0)
                        await call.write(batch)
                        batch = None
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the stream broke: report this batch and everything queued behind it
                code = getattr(err, "code", lambda: None)()
                self._broken(code.name if code else repr(err), ([batch] if batch else []) + self.queue)


class _TcpLink(_Link):
    """A connection to the peer's relay port: batches queue only until it is open."""

    conn: RelayConnection | None = None
    sent_epoch: int | None = None  # of the latest batch written

    def send(self, batch: worker_pb2.ValueBatch) -> None:
        if self.conn is None:
            self.queue.append(batch)
            return
        try:
            self.conn.send(Kind.BATCH, batch)
            self.sent_epoch = batch.epoch
        except ValueError as err:  # too large: only this step fails
            self.links.on_error(batch, str(err))
        except ConnectionError as err:
            self.close()
            self._broken(str(err), [batch], self.sent_epoch)

    async def run(self) -> None:
        settings = self.links.grpc_settings
        try:
            async with grpc.aio.insecure_channel(self.address, options=settings.channel_options()) as channel:
                port = (await worker_pb2_grpc.WorkerStub(channel).RelayEndpoint(
                    worker_pb2.RelayEndpointRequest(), timeout=10)).port
            first_epoch = self.queue[0].epoch if self.queue else 0
            self.conn = await RelayConnection.open(self.address, port, Kind.HELLO_FORWARD, first_epoch,
                                                   settings.max_message_bytes)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            code = getattr(err, "code", lambda: None)()
            self._broken(code.name if code else repr(err), self.queue)
            return
        queued, self.queue = self.queue, []
        for batch in queued:
            self.send(batch)
        try:  # the peer writes only to refuse: an ERROR frame per refused step, or one before it closes
            while (frame := await self.conn.receive()) is not None:
                reply = parse(worker_pb2.DriveReply, frame[1])
                log.warning("relay to peer %s: refused%s: %s: %s", self.peer,
                            f" session {reply.session}" if reply.session else "", reply.error_code,
                            reply.error_message)
            reason = "the peer closed the connection"
        except asyncio.CancelledError:
            raise
        except Exception as err:  # FrameError, a reset, an unreachable host...
            reason = repr(err)
        finally:
            self.conn.close()
        self._broken(reason, [], self.sent_epoch)


class PeerLinks:
    def __init__(self, grpc_settings: GrpcSettings, on_error: ErrorHandler) -> None:
        self.grpc_settings = grpc_settings
        self.on_error = on_error
        self.transport = "grpc"
        self.addresses: dict[str, str] = {}
        self._links: dict[str, _Link] = {}

    def update(self, addresses: dict[str, str], transport: str = "grpc") -> None:
        """New peer addresses and transport (from a program); a link whose address or
        transport changed is replaced on its next send."""
        if transport != self.transport:
            for peer in list(self._links):
                self._close_link(peer)
            self.transport = transport
        for name, address in addresses.items():
            if self.addresses.get(name) not in (None, address):
                self._close_link(name)
            self.addresses[name] = address

    def send(self, peer: str, batch: worker_pb2.ValueBatch) -> None:
        link = self._links.get(peer)
        if link is None:
            if peer not in self.addresses:
                self.on_error(batch, f"no address for peer worker {peer!r}")
                return
            link = self._links[peer] = (_TcpLink if self.transport == "tcp" else _GrpcLink)(self, peer)
        link.send(batch)

    def _drop(self, link: _Link) -> None:
        if self._links.get(link.peer) is link:
            del self._links[link.peer]

    def _close_link(self, peer: str) -> None:
        link = self._links.pop(peer, None)
        if link is not None:
            link.close()

    async def close(self) -> None:
        for peer in list(self._links):
            self._close_link(peer)
