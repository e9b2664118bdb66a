"""Outgoing relay links: one long-lived link to each peer worker, over the epoch's relay
transport (edgeheads.common.relay_transport, the same links the head node drives with).

The worker never waits on the network while it computes: ``send`` only writes or
queues. A link that breaks reports, through ``on_error``, the batches it could not
send, so the head node learns which session broke and why. Neither transport can say
which written batches the peer never read, so a broken link also reports the epoch of
the last one it wrote, without a session: the head node then fails that epoch's steps
in flight at once. The next send opens a new link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeheads.v1 import worker_pb2
from edgeheads.common.config import GrpcSettings
from edgeheads.common.relay_transport import LinkError, RelayLink, Role, connect

log = logging.getLogger(__name__)

ErrorHandler = Callable[[worker_pb2.ValueBatch, str], None]


@dataclass(eq=False)
class _Peer:
    name: str
    link: RelayLink
    watcher: asyncio.Task | None = field(default=None, repr=False)
    ended: bool = False


class PeerLinks:
    def __init__(self, grpc_settings: GrpcSettings, on_error: ErrorHandler) -> None:
        self.grpc_settings = grpc_settings
        self.on_error = on_error
        self.transport = "grpc"
        self.addresses: dict[str, str] = {}
        self._peers: dict[str, _Peer] = {}

    def update(self, addresses: dict[str, str], transport: str = "grpc") -> None:
        """New peer addresses and transport (from a program); a link whose address or
        transport changed is replaced on its next send."""
        if transport != self.transport:
            for name in list(self._peers):
                self._close(name)
            self.transport = transport
        for name, address in addresses.items():
            if self.addresses.get(name) not in (None, address):
                self._close(name)
            self.addresses[name] = address

    def link(self, name: str) -> RelayLink | None:
        """The open link to a peer, if any."""
        peer = self._peers.get(name)
        return peer.link if peer is not None else None

    def send(self, name: str, batch: worker_pb2.ValueBatch) -> None:
        peer = self._peers.get(name)
        if peer is None:
            address = self.addresses.get(name)
            if address is None:
                self.on_error(batch, f"no address for peer worker {name!r}")
                return
            peer = self._open(name, address, batch.epoch)
        try:
            peer.link.send(batch)
        except ValueError as err:  # too large: only this step fails
            self.on_error(batch, str(err))
        except ConnectionError as err:
            self._broken(peer, str(err), [batch])

    def _open(self, name: str, address: str, epoch: int) -> _Peer:
        settings = self.grpc_settings
        link = connect(self.transport, Role.FORWARD, address, epoch, settings.max_message_bytes,
                       channel_options=settings.channel_options())
        peer = self._peers[name] = _Peer(name, link)
        peer.watcher = asyncio.create_task(self._watch(peer))
        return peer

    async def _watch(self, peer: _Peer) -> None:
        """The peer writes only to refuse: a reply per refused step, or an error before it closes."""
        try:
            async for reply in peer.link.replies():
                log.warning("relay to peer %s: refused%s: %s: %s", peer.name,
                            f" session {reply.session}" if reply.session else "", reply.error_code,
                            reply.error_message)
            reason = "the peer closed the connection"
        except asyncio.CancelledError:
            raise
        except LinkError as err:
            reason = str(err)
        except Exception as err:  # a bug: still report it
            reason = repr(err)
        self._broken(peer, reason, [])

    def _broken(self, peer: _Peer, reason: str, failed: list[worker_pb2.ValueBatch]) -> None:
        """Report the batches that did not go, and that batches already written may be lost
        (a report without a session: the head node fails the epoch's steps in flight)."""
        if peer.ended:
            return
        message = f"relay to peer {peer.name} at {peer.link.address} failed: {reason}"
        log.warning(message)
        self._end(peer)
        for batch in failed + peer.link.unsent():
            self.on_error(batch, message)
        if peer.link.sent_epoch is not None:
            self.on_error(worker_pb2.ValueBatch(epoch=peer.link.sent_epoch), message)

    def _end(self, peer: _Peer) -> None:
        peer.ended = True
        if self._peers.get(peer.name) is peer:
            del self._peers[peer.name]
        if peer.watcher is not None and peer.watcher is not asyncio.current_task():
            peer.watcher.cancel()
        peer.link.close()

    def _close(self, name: str) -> None:
        peer = self._peers.get(name)
        if peer is not None:
            self._end(peer)

    async def close(self) -> None:
        for name in list(self._peers):
            self._close(name)
