"""The worker's relay TCP port: the ``tcp`` transport's form of the Drive and Forward
RPCs, over the frames of common/relay_wire.py; a thin adapter over the worker's
RelayEndpoint, as the gRPC servicer is (the dialling side is common/relay_transport.py).

- A HELLO_DRIVE connection is the head node's: BATCH frames in (step inputs), REPLY
  frames out (results and per-session errors), as on a Drive stream.
- A HELLO_FORWARD connection is a peer worker's: BATCH frames in; out only ERROR frames.
- A well-formed batch that cannot run (bad values, unknown session) fails only its step:
  the head node is told, the sender gets an ERROR frame naming the step, and the
  connection goes on.
- A broken frame (or no hello within HELLO_TIMEOUT_SECONDS) gets one ERROR frame and the
  connection closes. If that connection was a live peer link (it had delivered batches),
  anything on its way through it is lost, so the head node of its latest epoch is told at
  once and fails that epoch's steps in flight rather than waiting for its step timeout.
  That can include other sessions' steps; connections of other epochs are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from edgeheads.v1 import worker_pb2
from edgeheads.worker.host import status_name
from edgeheads.worker.relay_endpoint import RelayEndpoint
from edgeheads.common.relay_wire import (
    HELLO_TIMEOUT_SECONDS, FrameError, Kind, encode_message, error_frame, parse, read_frame, tune)

log = logging.getLogger(__name__)


def listening_socket(host: str, port: int) -> socket.socket:
    """One listening socket, so there is one port to report: a dual-stack one for ``::``,
    else the first address ``host`` resolves to ('' and 0.0.0.0: every IPv4 address)."""
    host = host.strip("[]")
    if host == "::":
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", port)
    else:
        family, kind, proto, _, address = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class RelayPort:
    def __init__(self, endpoint: RelayEndpoint, max_bytes: int) -> None:
        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.frames_received = 0
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        try:
            sock = listening_socket(host, port)
        except OSError as err:
            raise OSError(f"cannot listen for relay traffic on {host or '*'}:{port}: {err.strerror or err}") from None
        self.server = await asyncio.start_server(self._handle, sock=sock)
        self.port = sock.getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._connections):
            writer.close()
        self._connections.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tune(writer)
        self._connections.add(writer)
        peer = writer.get_extra_info("peername")
        live: list[int] = []  # the epoch of the latest batch a peer connection delivered
        name = self.endpoint.name
        try:
            try:
                first = await asyncio.wait_for(read_frame(reader, self.max_bytes), HELLO_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                raise FrameError("DEADLINE_EXCEEDED", f"no hello frame within {HELLO_TIMEOUT_SECONDS:.0f} s") from None
            if first is None:
                return
            kind, payload = first
            if kind not in (Kind.HELLO_DRIVE, Kind.HELLO_FORWARD):
                raise FrameError("INVALID_ARGUMENT", f"a relay connection must open with a hello frame, not {kind.name}")
            hello = parse(worker_pb2.ValueBatch, payload)
            if kind is Kind.HELLO_DRIVE:  # the head node reads any ERROR frame itself
                await self._drive(hello.epoch, reader, writer)
            else:
                await self._forward(live, reader, writer)
        except FrameError as err:
            log.warning("worker %s: relay connection from %s: %s: %s", name, peer, err.code, err)
            self._broken(writer, live, err.code, f"relay connection from {peer}: {err}")
        except ConnectionError as err:
            log.info("worker %s: relay connection from %s ended: %r", name, peer, err)
            self._broken(writer, live, "UNAVAILABLE", f"relay connection from {peer} broke: {err!r}")
        except Exception as err:  # a bug or the machine (e.g. out of memory): still fail fast, keep serving
            log.exception("worker %s: relay connection from %s failed", name, peer)
            self._broken(writer, live, "INTERNAL", f"relay connection from {peer}: {err!r}")
        finally:
            self._connections.discard(writer)
            writer.close()

    def _broken(self, writer: asyncio.StreamWriter, live: list[int], code: str, message: str) -> None:
        self._send_error(writer, code, message)
        if live:
            self.endpoint.report(worker_pb2.ValueBatch(epoch=live[-1]), code, message)

    async def _drive(self, epoch: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def sink(reply: worker_pb2.DriveReply) -> None:
            if not writer.is_closing():
                writer.write(encode_message(Kind.REPLY, reply))
        self.endpoint.attach_drive(epoch, sink)
        try:
            while (frame := await read_frame(reader, self.max_bytes)) is not None:
                await self._run(frame, None)  # a failed step is reported on this connection already
        finally:
            self.endpoint.detach_drive(sink)

    async def _forward(self, live: list[int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (frame := await read_frame(reader, self.max_bytes)) is not None:
            batch = await self._run(frame, writer)
            if batch is not None:
                live[:] = [batch.epoch]

    async def _run(self, frame: tuple[Kind, bytes], writer: asyncio.StreamWriter | None) -> worker_pb2.ValueBatch | None:
        """Run one BATCH frame; the batch if it was accepted. A refused one gets an ERROR
        frame naming its step when ``writer`` is given."""
        kind, payload = frame
        self.frames_received += 1
        if kind is not Kind.BATCH:
            raise FrameError("INVALID_ARGUMENT", f"expected a BATCH relay frame, got {kind.name}")
        batch = parse(worker_pb2.ValueBatch, payload)
        err = await self.endpoint.deliver(batch)
        if err is None:
            return batch
        if writer is not None:
            self._send_error(writer, status_name(err), str(err), batch)
        return None

    @staticmethod
    def _send_error(writer: asyncio.StreamWriter, code: str, message: str,
                    batch: worker_pb2.ValueBatch | None = None) -> None:
        if not writer.is_closing():
            writer.write(error_frame(code, message, batch))
