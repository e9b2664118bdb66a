"""The relay data plane's wire: length-prefixed, checksummed frames over plain TCP.

Relay activations are small (a few KiB) and frequent (two sequential hops per layer per
token), and on small boards a gRPC message costs several times a raw TCP write (see
docs/decisions.md). So with ``relay_transport: tcp`` they travel as frames on one TCP
connection per (sender, receiver) pair; everything else stays on gRPC.

A frame is a 16-byte header and a payload::

    magic "EHR1" | kind u8 | 3 zero bytes | payload length u32 LE | crc32(payload) u32 LE

The payload is a serialized protobuf (ValueBatch or DriveReply, the same messages the
gRPC transport sends), so tensors are still {dtype, shape, raw bytes} and nothing is
ever unpickled. A connection opens with a hello: a TOKEN frame holding the cluster token (when
the sender has one) and a HELLO_DRIVE (the head node) or HELLO_FORWARD (a peer worker) frame,
written together; before the hello is accepted no frame may exceed HELLO_MAX_BYTES. With TLS
configured the connection is a TLS one from its first byte (the worker's relay port).
The receiver answers bad input with an ERROR frame carrying a
DriveReply whose error_code is a gRPC status name: a broken frame (magic, kind, size,
checksum, truncation) also closes the connection, since nothing after it can be trusted;
a well-formed batch with bad values names its step and the connection goes on.

This module is the frames only. The dialling side (a TCP link or a gRPC stream behind
one interface) is relay_transport.py; the listening side is the worker's relay port.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
import zlib

from edgeheads.v1 import worker_pb2
from edgeheads.common.config import split_host_port

MAGIC = b"EHR1"
HEADER = struct.Struct("<4sB3sII")
RESERVED = bytes(3)
HELLO_TIMEOUT_SECONDS = 10.0
HELLO_MAX_BYTES = 64 << 10  # a hello is an epoch and a token; nobody unauthenticated sends more


class Kind(enum.IntEnum):
    HELLO_DRIVE = 1    # ValueBatch naming the epoch it drives; the head node's connection
    HELLO_FORWARD = 2  # ValueBatch (the epoch of the first batch); a peer worker's connection
    BATCH = 3          # ValueBatch
    REPLY = 4          # DriveReply, worker -> head node
    ERROR = 5          # DriveReply with error_code set (without a step: the sender then closes)
    TOKEN = 6          # the cluster token (UTF-8), just before the hello frame


class FrameError(Exception):
    """A bad frame. ``code`` is the gRPC status name it maps to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode(kind: Kind, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, kind, RESERVED, len(payload), zlib.crc32(payload)) + payload


def encode_message(kind: Kind, message) -> bytes:
    return encode(kind, message.SerializeToString())


def parse_header(header: bytes, max_bytes: int) -> tuple[Kind, int, int]:
    """(kind, payload length, crc) of a 16-byte header."""
    magic, kind, reserved, length, crc = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError("INVALID_ARGUMENT", f"not an edgeheads relay frame (magic {magic!r})")
    if reserved != RESERVED:
        raise FrameError("INVALID_ARGUMENT", f"relay frame header has non-zero reserved bytes {reserved!r}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise FrameError("INVALID_ARGUMENT", f"unknown relay frame kind {kind}") from None
    if length > max_bytes:
        raise FrameError("RESOURCE_EXHAUSTED", f"relay frame of {length} bytes exceeds the limit of {max_bytes}")
    return kind, length, crc


def check_payload(payload: bytes, crc: int) -> None:
    if zlib.crc32(payload) != crc:
        raise FrameError("DATA_LOSS", "relay frame checksum mismatch")


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> tuple[Kind, bytes] | None:
    """The next frame, or None at a clean end of stream (between frames)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise FrameError("DATA_LOSS", f"relay stream ended inside a frame header ({len(err.partial)} bytes)") from None
    kind, length, crc = parse_header(header, max_bytes)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as err:
        raise FrameError("DATA_LOSS", f"relay stream ended {len(err.partial)} bytes into a "
                                      f"{length}-byte frame") from None
    check_payload(payload, crc)
    return kind, payload


def parse(message_type, payload: bytes):
    try:
        return message_type.FromString(payload)
    except Exception:  # protobuf's DecodeError; anything it raises is the same verdict
        raise FrameError("INVALID_ARGUMENT", f"relay frame is not a valid {message_type.__name__}") from None


def encode_hello(kind: Kind, epoch: int, token: str | None) -> bytes:
    """The frames that open a connection: the token's (when there is one) and the hello."""
    hello = encode_message(kind, worker_pb2.ValueBatch(epoch=epoch))
    return (encode(Kind.TOKEN, token.encode("utf-8")) + hello) if token else hello


async def read_hello(reader: asyncio.StreamReader) -> tuple[Kind, bytes, bytes | None] | None:
    """(hello kind, hello payload, token or None) of a connection's opening frames, or None if it
    ended before any. The kind is the second frame's when a TOKEN frame came first; checking
    that it is a hello kind is the caller's."""
    first = await read_frame(reader, HELLO_MAX_BYTES)
    if first is None or first[0] is not Kind.TOKEN:
        return None if first is None else (first[0], first[1], None)
    hello = await read_frame(reader, HELLO_MAX_BYTES)
    if hello is None:
        raise FrameError("INVALID_ARGUMENT", "a relay connection sent its token but no hello")
    return hello[0], hello[1], first[1]


def error_frame(code: str, message: str, batch: worker_pb2.ValueBatch | None = None) -> bytes:
    reply = worker_pb2.DriveReply(error_code=code, error_message=message)
    if batch is not None:
        reply.session, reply.epoch, reply.position = batch.session, batch.epoch, batch.position
    return encode_message(Kind.ERROR, reply)


def tune(writer: asyncio.StreamWriter) -> None:
    """No Nagle delay: every frame is a whole message someone is waiting for."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def relay_address(grpc_address: str, port: int) -> tuple[str, int]:
    """Dial the relay port on the host the gRPC address names."""
    return split_host_port(grpc_address)[0], port

