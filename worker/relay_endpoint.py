"""A worker's relay endpoint: everything the relay dataflow keeps on a worker, behind one
public API that both of its front doors adapt to.

It owns the installed programs (a RelayExecutor), the links to peer workers (PeerLinks)
and, per epoch, where replies for the head node go (its drive: a gRPC Drive stream or a
connection on the relay TCP port). The gRPC servicer (relay_service.py) and the TCP port
(relay_port.py) only turn their wire into calls of ``install``, ``attach_drive`` /
``detach_drive``, ``deliver`` and ``report``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from edgeheads.v1 import tensor_pb2, worker_pb2
from edgeheads.worker.host import BlockHost, HostError, status_name
from edgeheads.worker.peers import PeerLinks
from edgeheads.worker.relay import ProgramCall, RelayExecutor
from edgeheads.common.config import GrpcSettings
from edgeheads.common.relay_transport import TRANSPORTS
from edgeheads.common.wire import WireError, fill_tensor_proto, tensor_from_proto

log = logging.getLogger(__name__)

MAX_HELD_REPLIES = 256  # per epoch, while its drive is not attached yet
ReplySink = Callable[[worker_pb2.DriveReply], None]  # writes one reply to the head node; never waits


class RelayEndpoint:
    def __init__(self, host: BlockHost, grpc_settings: GrpcSettings) -> None:
        self.host = host
        self.executor = RelayExecutor(host)
        self.peers = PeerLinks(grpc_settings, lambda batch, message: self.report(batch, "UNAVAILABLE", message))
        self._drives: dict[int, ReplySink] = {}  # epoch -> the head node's drive
        # replies made before their epoch's drive registered here: the head node opens its drives
        # one after another once every program is installed, so a fast first step can finish on a
        # worker whose drive hello is still in flight
        self._held: dict[int, list[worker_pb2.DriveReply]] = {}

    @property
    def name(self) -> str:
        return self.host.name

    # ------------------------------------------------------------ programs and drives
    def install(self, epoch: int, calls: list[ProgramCall], peers: dict[str, str], transport: str = "") -> None:
        """Keep the program of ``epoch`` and the addresses of the peers it sends to.
        HostError (a status name) if the program or the transport is not acceptable."""
        if transport not in ("", *TRANSPORTS):
            raise HostError("INVALID_ARGUMENT", f"unknown relay transport {transport!r} (tcp or grpc)")
        self.executor.install(epoch, calls)
        self.peers.update(peers, transport or "grpc")
        for old in [e for e in self._held if e not in self.executor.programs]:
            del self._held[old]

    def attach_drive(self, epoch: int, sink: ReplySink) -> None:
        """Replies for the head node of ``epoch`` go to ``sink`` from now on, those held
        for it first."""
        self._drives[epoch] = sink
        for reply in self._held.pop(epoch, []):
            sink(reply)

    def detach_drive(self, sink: ReplySink) -> None:
        """The drive behind ``sink`` ended (a newer drive of its epoch stays)."""
        for epoch in [e for e, s in self._drives.items() if s is sink]:
            del self._drives[epoch]

    def has_drive(self, epoch: int) -> bool:
        return epoch in self._drives

    def drop_session(self, session: str) -> int:
        """Forget the session's half-done steps; how many there were."""
        return self.executor.drop_session(session)

    def peer_addresses(self) -> list[str]:
        return list(self.peers.addresses.values())

    async def close(self) -> None:
        await self.peers.close()

    # ------------------------------------------------------------ the hop path
    async def deliver(self, batch: worker_pb2.ValueBatch) -> Exception | None:
        """Run what the batch makes ready and send the results on. A batch without a session
        is refused (returned); a step that fails is reported to the head node (it ends that
        session only) and its error returned."""
        if not batch.session:
            return HostError("INVALID_ARGUMENT", "a relay batch must name its session")
        try:
            values = {nt.name: tensor_from_proto(nt.tensor, nt.name) for nt in batch.values}
            for out, path in self.executor.deliver(batch.session, batch.epoch, batch.position, values,
                                                   batch.path_compute_seconds, batch.reserve_tokens):
                made: dict[str, tensor_pb2.NamedTensor] = {}  # a value sent to two places is encoded once
                for dest, tensors in out:
                    # the same fields either way: a ValueBatch to a peer, a DriveReply to the head node
                    kind = worker_pb2.ValueBatch if dest else worker_pb2.DriveReply
                    message = kind(session=batch.session, epoch=batch.epoch, position=batch.position,
                                   path_compute_seconds=path)
                    if dest:
                        message.reserve_tokens = batch.reserve_tokens
                    for n, t in tensors.items():
                        nt = message.values.add(name=n)
                        if n in made:
                            nt.CopyFrom(made[n])
                        else:
                            fill_tensor_proto(nt.tensor, t)
                            made[n] = nt
                    if dest:
                        self.peers.send(dest, message)
                    else:
                        self.to_head(batch.epoch, message)
                if self.peers.transport != "tcp":  # tcp writes go out at once; a gRPC send needs its pump
                    await asyncio.sleep(0)  # to run before computing on
        except (HostError, WireError) as err:
            log.warning("worker %s: relay step of session %s failed: %s", self.name, batch.session, err)
            self.report(batch, status_name(err), str(err))
            return err
        return None

    def report(self, batch: worker_pb2.ValueBatch, code: str, message: str) -> None:
        """Tell the head node of ``batch.epoch`` that its step failed; without a session,
        that the epoch's steps in flight may be lost."""
        self.to_head(batch.epoch, worker_pb2.DriveReply(
            session=batch.session, epoch=batch.epoch, position=batch.position, error_code=code,
            error_message=f"worker {self.name}: {message}"))

    def to_head(self, epoch: int, reply: worker_pb2.DriveReply) -> None:
        sink = self._drives.get(epoch)
        if sink is not None:
            sink(reply)
            return
        held = self._held.setdefault(epoch, []) if epoch in self.executor.programs else None
        if held is not None and len(held) < MAX_HELD_REPLIES:
            held.append(reply)  # its drive is on its way
        else:
            log.warning("worker %s: no head node drives epoch %d; dropped a reply for session %s",
                        self.name, epoch, reply.session)
