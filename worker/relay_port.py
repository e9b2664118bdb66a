"""The worker's relay TCP port: the ``tcp`` transport's form of the Drive and Forward
RPCs, over the frames of runtime/relay_wire.py.

- A HELLO_DRIVE connection is the head node's: BATCH frames in (step inputs), REPLY
  frames out (results and per-session errors), as on a Drive stream.
- A HELLO_FORWARD connection is a peer worker's: BATCH frames in, nothing out unless it
  breaks, as on a Forward stream.
- A bad frame gets one ERROR frame with a gRPC status name and the connection closes.
  When the frame cannot be tied to a session and the connection had delivered batches,
  the head node of the latest epoch on it is told, so the steps in flight fail at once
  instead of timing out.
  Other connections and sessions are not touched.
"""

from __future__ import annotations

import asyncio
import logging

from edgeheads.v1 import worker_pb2
from edgeheads.worker.host import status_name
from edgeheads.worker.runtime.relay_wire import (
    HELLO_TIMEOUT_SECONDS, FrameError, Kind, encode_message, error_frame, parse, read_frame, tune)
from edgeheads.worker.runtime.wire import WireError

log = logging.getLogger(__name__)


class RelayPort:
    def __init__(self, service, max_bytes: int) -> None:
        """``service`` is the WorkerService (its RelayRpcs half does the work)."""
        self.service = service
        self.max_bytes = max_bytes
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        host = None if host in ("", "0.0.0.0", "[::]", "::") else host.strip("[]")
        try:
            self.server = await asyncio.start_server(self._handle, host, port)
        except OSError as err:
            raise OSError(f"cannot listen for relay traffic on {host or '*'}:{port}: {err.strerror}") from None
        self.port = self.server.sockets[0].getsockname()[1]
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
        seen: list[int] = []  # the epoch of the latest batch a peer connection delivered
        try:
            first = await asyncio.wait_for(read_frame(reader, self.max_bytes), HELLO_TIMEOUT_SECONDS)
            if first is None:
                return
            kind, payload = first
            if kind not in (Kind.HELLO_DRIVE, Kind.HELLO_FORWARD):
                raise FrameError("INVALID_ARGUMENT", f"a relay connection must open with a hello frame, not {kind.name}")
            epoch = parse(worker_pb2.ValueBatch, payload).epoch
            if kind is Kind.HELLO_DRIVE:  # the head node reads the ERROR frame itself
                await self._drive(epoch, reader, writer)
            else:
                await self._forward(seen, reader, writer)
        except FrameError as err:
            log.warning("worker %s: relay connection from %s: %s: %s", self.service.host.name, peer, err.code, err)
            self._send_error(writer, err.code, str(err))
            if seen:  # a live peer link broke: whatever was on its way through it is lost
                self.service._report(worker_pb2.ValueBatch(epoch=seen[-1]), err.code,
                                     f"relay connection from {peer}: {err}")
        except (asyncio.TimeoutError, ConnectionError) as err:
            log.info("worker %s: relay connection from %s ended: %r", self.service.host.name, peer, err)
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _drive(self, epoch: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def sink(reply: worker_pb2.DriveReply) -> None:
            if not writer.is_closing():
                writer.write(encode_message(Kind.REPLY, reply))
        self.service.drives[epoch] = sink
        try:
            while (frame := await read_frame(reader, self.max_bytes)) is not None:
                await self._run(frame)  # a failed step was reported on this connection already
        finally:
            if self.service.drives.get(epoch) is sink:
                del self.service.drives[epoch]

    async def _forward(self, seen: list[int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (frame := await read_frame(reader, self.max_bytes)) is not None:
            batch, err = await self._run(frame)
            seen[:] = [batch.epoch]
            if isinstance(err, WireError):  # as a Forward stream is aborted (the session was told)
                self._send_error(writer, status_name(err), str(err), batch)
                return

    async def _run(self, frame: tuple[Kind, bytes]) -> tuple[worker_pb2.ValueBatch, Exception | None]:
        kind, payload = frame
        if kind is not Kind.BATCH:
            raise FrameError("INVALID_ARGUMENT", f"expected a BATCH relay frame, got {kind.name}")
        batch = parse(worker_pb2.ValueBatch, payload)
        return batch, await self.service._deliver(batch)

    @staticmethod
    def _send_error(writer: asyncio.StreamWriter, code: str, message: str,
                    batch: worker_pb2.ValueBatch | None = None) -> None:
        if not writer.is_closing():
            writer.write(error_frame(code, message, batch))
