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
- With mutual TLS configured, a connection is TLS from its first byte: nothing is read before
  the handshake, and one that fails (a plaintext client, a certificate of another CA) is closed.
  With a cluster token, a hello without it (or with another) gets an UNAUTHENTICATED ERROR
  frame and the connection closes. Both refusals are logged with the peer's address (rate-
  limited, edgeheads.common.auth.RefusalLog); the port goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from edgeheads.v1 import worker_pb2
from edgeheads.worker.host import status_name
from edgeheads.worker.relay_endpoint import RelayEndpoint
from edgeheads.common.auth import RefusalLog, token_matches
from edgeheads.common.relay_wire import (
    HELLO_TIMEOUT_SECONDS, FrameError, Kind, encode_message, error_frame, parse, read_frame, read_hello, tune)
from edgeheads.common.security import Security, current_security

log = logging.getLogger(__name__)


class _Unread(asyncio.StreamReaderProtocol):
    """A stream protocol that reads nothing until the handler says so (``resume_reading`` or
    ``start_tls``): bytes read before a TLS handshake would be lost to it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        super().connection_made(transport)


def _handshake_failure(err: BaseException) -> str:
    """Why a TLS handshake on the relay port failed, in words."""
    if isinstance(err, ssl.SSLError):
        reason = err.reason or str(err)
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD", "RECORD_LAYER_FAILURE"):
            return f"not a TLS client (a plaintext connection to a TLS relay port; {reason})"
        return f"TLS handshake failed ({reason}): no certificate of the cluster CA?"
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return f"no TLS handshake within {HELLO_TIMEOUT_SECONDS:.0f} s"
    return f"TLS handshake broken off by the client ({type(err).__name__}): it does not trust this worker's " \
           "certificate?"


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
    """``security`` None: the process's (edgeheads.common.security.install_security)."""

    def __init__(self, endpoint: RelayEndpoint, max_bytes: int, security: Security | None = None) -> None:
        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.security = current_security() if security is None else security
        self.refusals = RefusalLog(log)
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.frames_received = 0
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        try:
            sock = listening_socket(host, port)
        except OSError as err:
            raise OSError(f"cannot listen for relay traffic on {host or '*'}:{port}: {err.strerror or err}") from None
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Unread(asyncio.StreamReader(), self._handle), sock=sock)
        self.port = sock.getsockname()[1]
        return self.port

    async def _secure(self, writer: asyncio.StreamWriter, peer) -> bool:
        """Start reading: after a TLS handshake when TLS is configured. False (logged) if it failed."""
        if self.security.tls is None:
            writer.transport.resume_reading()  # type: ignore[attr-defined]
            return True
        try:
            await writer.start_tls(self.security.ssl_contexts[0], ssl_handshake_timeout=HELLO_TIMEOUT_SECONDS)
        except (OSError, asyncio.TimeoutError) as err:  # ssl.SSLError is an OSError
            self.refusals.refused(_handshake_failure(err), peer, f"a relay connection to worker {self.endpoint.name}")
            return False
        return True

    def _authorized(self, token: bytes | None, writer: asyncio.StreamWriter, peer) -> bool:
        """Whether the hello's token is the cluster's (always, without one); a refusal is logged
        and answered with an UNAUTHENTICATED ERROR frame."""
        if not self.security.token or token_matches(token, self.security.token):
            return True
        reason = "no cluster token" if token is None else "a wrong cluster token"
        self.refusals.refused(reason, peer, f"a relay hello to worker {self.endpoint.name}")
        self._send_error(writer, "UNAUTHENTICATED", f"{reason}: this relay port needs the cluster's token")
        return False

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
            if not await self._secure(writer, peer):
                return
            try:
                first = await asyncio.wait_for(read_hello(reader), HELLO_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                raise FrameError("DEADLINE_EXCEEDED", f"no hello frame within {HELLO_TIMEOUT_SECONDS:.0f} s") from None
            if first is None:
                return
            kind, payload, token = first
            if kind not in (Kind.HELLO_DRIVE, Kind.HELLO_FORWARD):
                raise FrameError("INVALID_ARGUMENT", f"a relay connection must open with a hello frame, not {kind.name}")
            if not self._authorized(token, writer, peer):
                return
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
