"""The dialling side of the relay data plane, one interface for both transports.

A relay *link* is one long-lived stream from a sender to a worker: the head node's
drive (step inputs out, results and errors back) or a worker's forward link to a peer
(batches out; back only refusals). The head node's RelayDriver and the workers'
PeerLinks both open their links here, with ``connect``:

- ``tcp``: a connection to the worker's relay port (asked for with the RelayEndpoint
  RPC, dialled on the host of its gRPC address), carrying frames (relay_wire.py), over
  mutual TLS when the node has it, opening with the cluster token when there is one. A
  ``send`` writes at once and never waits; it is the hop path, so it makes no call it
  does not need (docs/decisions.md, "Where a relay hop's time goes").
- ``grpc``: a Drive or Forward stream. A stream allows one write at a time, so ``send``
  queues and one pump task writes.

Either way ``send`` never awaits. Batches sent before the link is open wait for it.
``replies()`` opens the link, yields DriveReply messages, returns when the receiver
ends the stream cleanly and raises LinkError when it breaks or refuses the link. Then
``unsent()`` are the batches that never reached the wire and ``sent_epoch`` the epoch
of the last one that did (it may be lost: neither transport can say which written
batches the receiver never read).
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import AsyncIterator, Sequence

import grpc

from edgeheads.common.channels import aio_channel
from edgeheads.common.relay_wire import (
    HELLO_TIMEOUT_SECONDS, FrameError, Kind, encode, encode_hello, parse, read_frame, relay_address, tune)
from edgeheads.common.security import Security, current_security
from edgeheads.v1 import worker_pb2, worker_pb2_grpc

TRANSPORTS = ("tcp", "grpc")
_background: set[asyncio.Task] = set()  # shutdowns in progress (a task nobody holds can be collected)


class Role(enum.Enum):
    DRIVE = "drive"      # the head node's: step inputs out, DriveReply messages back
    FORWARD = "forward"  # a worker's to a peer: batches out, only refusals back


class LinkError(Exception):
    """A link that could not open, broke, or was refused; ``code`` is a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def link_error(err: BaseException) -> LinkError:
    if isinstance(err, LinkError):
        return err
    if isinstance(err, FrameError):
        return LinkError(err.code, str(err))
    if isinstance(err, grpc.aio.AioRpcError):
        return LinkError(err.code().name, err.details() or "")
    return LinkError("UNAVAILABLE", repr(err))


class RelayLink:
    """One relay stream to the worker serving gRPC at ``address``; made by ``connect``."""

    transport = ""

    def __init__(self, role: Role, address: str, epoch: int, max_bytes: int,
                 stub: worker_pb2_grpc.WorkerStub | None, channel_options: Sequence[tuple[str, int]],
                 security: Security) -> None:
        self.role = role
        self.address = address
        self.epoch = epoch
        self.max_bytes = max_bytes
        self.security = security
        self.sent_epoch: int | None = None  # of the latest batch written
        self.closed = False
        self._channel = None  # owned when no stub was given
        if stub is None:
            self._channel = aio_channel(address, list(channel_options), security)
            stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._stub = stub
        self._opening: asyncio.Future | None = None

    def _start(self) -> None:
        self._opening = asyncio.ensure_future(self._open())
        self._opening.add_done_callback(lambda task: task.cancelled() or task.exception())  # read by opened()

    async def _open(self) -> None:
        raise NotImplementedError

    async def opened(self) -> None:
        """Wait until the link is open; LinkError if it cannot be."""
        try:
            await self._opening
        except asyncio.CancelledError:
            if self.closed:
                raise LinkError("CANCELLED", f"the relay link to {self.address} was closed") from None
            raise

    def send(self, batch: worker_pb2.ValueBatch) -> None:
        """Write (or queue) one batch. ConnectionError once the link is known closed;
        ValueError for a batch over the size limit (only its step should fail)."""
        raise NotImplementedError

    def replies(self) -> AsyncIterator[worker_pb2.DriveReply]:
        raise NotImplementedError

    def unsent(self) -> list[worker_pb2.ValueBatch]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _too_large(self, size: int) -> ValueError:
        return ValueError(f"relay message of {size} bytes exceeds the limit of {self.max_bytes} "
                          "(grpc.max_message_bytes)")


class TcpLink(RelayLink):
    transport = "tcp"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._queued: list[tuple[worker_pb2.ValueBatch, bytes]] = []  # sent before the link opened
        self._start()

    async def _open(self) -> None:
        try:
            try:
                port = (await self._stub.RelayEndpoint(worker_pb2.RelayEndpointRequest(), timeout=10)).port
            finally:
                if self._channel is not None:
                    await self._channel.close()
        except grpc.aio.AioRpcError as err:
            raise LinkError(err.code().name, f"asking {self.address} for its relay port: {err.details()}") from None
        host, port = relay_address(self.address, port)
        tls = {}
        if self.security.tls is not None:  # the worker's certificate must name the host dialed
            tls = dict(ssl=self.security.ssl_contexts[1], server_hostname=self.security.relay_server_hostname(host),
                       ssl_handshake_timeout=HELLO_TIMEOUT_SECONDS)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, **tls), HELLO_TIMEOUT_SECONDS)
        except (OSError, asyncio.TimeoutError) as err:
            raise LinkError("UNAVAILABLE", f"connecting to the relay port {host}:{port}: {err!r}") from None
        tune(writer)
        hello = Kind.HELLO_DRIVE if self.role is Role.DRIVE else Kind.HELLO_FORWARD
        writer.write(encode_hello(hello, self.epoch, self.security.token)
                     + b"".join(frame for _, frame in self._queued))
        if self._queued:
            self.sent_epoch = self._queued[-1][0].epoch
        self._queued.clear()
        self._reader, self._writer = reader, writer

    def send(self, batch: worker_pb2.ValueBatch) -> None:
        writer = self._writer
        if self.closed or (writer is not None and writer.is_closing()):
            raise ConnectionError("relay connection is closed")
        payload = batch.SerializeToString()
        if len(payload) > self.max_bytes:
            raise self._too_large(len(payload))
        if writer is None:
            self._queued.append((batch, encode(Kind.BATCH, payload)))
            return
        writer.write(encode(Kind.BATCH, payload))
        self.sent_epoch = batch.epoch

    async def replies(self) -> AsyncIterator[worker_pb2.DriveReply]:
        await self.opened()
        try:
            while (frame := await read_frame(self._reader, self.max_bytes)) is not None:
                reply = parse(worker_pb2.DriveReply, frame[1])
                if frame[0] is Kind.ERROR and not reply.session:  # the receiver closes the connection
                    raise LinkError(reply.error_code or "UNKNOWN", reply.error_message)
                yield reply
        except (FrameError, OSError) as err:  # a reset, a damaged frame...
            raise link_error(err) from None
        finally:  # asyncio would otherwise accept writes to a socket the peer has closed
            self.closed = True

    def unsent(self) -> list[worker_pb2.ValueBatch]:
        return [batch for batch, _ in self._queued]

    def close(self) -> None:
        self.closed = True
        if not self._opening.done():
            self._opening.cancel()
        if self._writer is not None:
            self._writer.close()


class GrpcLink(RelayLink):
    transport = "grpc"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.call = self._stub.Drive() if self.role is Role.DRIVE else self._stub.Forward()
        self._queue: deque[worker_pb2.ValueBatch] = deque()  # not yet written
        self._ready = asyncio.Event()
        self._pump: asyncio.Task | None = None
        self.error: LinkError | None = None  # why the pump stopped
        self._start()

    async def _open(self) -> None:
        if self.role is Role.DRIVE:  # the opening message names the epoch this stream drives
            try:
                await self.call.write(worker_pb2.ValueBatch(epoch=self.epoch))
            except Exception as err:
                raise link_error(err) from None
        self._pump = asyncio.create_task(self._write_queued())

    async def _write_queued(self) -> None:
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._queue:
                    await self.call.write(self._queue[0])
                    self.sent_epoch = self._queue.popleft().epoch
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the stream broke; replies() raises this
            self.error = link_error(err)
            if not self.call.done():
                self.call.cancel()

    def send(self, batch: worker_pb2.ValueBatch) -> None:
        if self.closed or self.error is not None or self.call.done():
            raise ConnectionError("relay stream is closed")
        self._queue.append(batch)
        self._ready.set()

    async def replies(self) -> AsyncIterator[worker_pb2.DriveReply]:
        await self.opened()
        try:
            if self.role is Role.DRIVE:
                async for reply in self.call:
                    yield reply
            else:
                await self.call  # a ForwardReply when the receiver ends the stream
        except asyncio.CancelledError:
            if self.error is None or self.closed:
                raise
            raise self.error from None
        except grpc.aio.AioRpcError as err:
            raise self.error or link_error(err) from None
        if self.error is not None:
            raise self.error

    def unsent(self) -> list[worker_pb2.ValueBatch]:
        return list(self._queue)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in (self._opening, self._pump):
            if task is not None and not task.done():
                task.cancel()
        task = asyncio.ensure_future(self._finish())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _finish(self) -> None:
        try:
            if not self.call.done():
                await self.call.done_writing()
        except Exception:  # already broken: nothing to end
            pass
        finally:
            if self._channel is not None:
                await self._channel.close()


def connect(transport: str, role: Role, address: str, epoch: int, max_bytes: int, *,
            stub: worker_pb2_grpc.WorkerStub | None = None,
            channel_options: Sequence[tuple[str, int]] = (), security: Security | None = None) -> RelayLink:
    """Start opening a relay link to the worker serving gRPC at ``address``, for ``epoch``.
    ``stub`` is a Worker stub on a channel the caller keeps; without one the link opens
    its own channel (with ``channel_options``) and closes it when done with it.
    ``security`` (TLS, token; None: the process's) is the TCP link's and its own channel's."""
    if transport not in TRANSPORTS:
        raise ValueError(f"relay transport must be 'tcp' or 'grpc', not {transport!r}")
    security = current_security() if security is None else security
    return (TcpLink if transport == "tcp" else GrpcLink)(role, address, epoch, max_bytes, stub, channel_options,
                                                         security)
