"""Fuzz cases for the workers' relay TCP ports (common/relay_wire.py frames), and the exchange
that sends one and reads what comes back (used by fuzz_run.py).

A case is the bytes of one connection: random bytes, an HTTP request, or a sequence of frames of
every kind (and unknown kinds), each frame possibly broken in its header (magic, reserved bytes,
kind, length, checksum) and the whole possibly cut short. Frames that decode as a ValueBatch are
defanged like the gRPC Drive and Forward requests (fuzz_cases._defang_batch): no drive hello
names a live epoch and no batch that could run a live program goes without a value it refuses.
"""

from __future__ import annotations

import random
import socket
import time
import zlib
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from edgeheads.common.relay_wire import HEADER, MAGIC, RESERVED, Kind
from edgeheads.v1 import worker_pb2
from fuzz_cases import Env, RelayCase, _defang_batch, rand_batch
from fuzz_values import break_bytes, random_message

UNKNOWN_KINDS = [0, 7, 200, 255]
HEADER_FAULTS = ["magic", "reserved", "crc", "longer", "shorter", "oversized"]


def frame(kind: int, payload: bytes, fault: str | None, rng: random.Random) -> bytes:
    length, crc, magic, reserved = len(payload), zlib.crc32(payload), MAGIC, RESERVED
    if fault == "magic":
        magic = rng.choice([b"EHR2", b"\x00\x00\x00\x00", b"GET "])
    elif fault == "reserved":
        reserved = b"\x00\x01\x00"
    elif fault == "crc":
        crc ^= 1 << rng.randrange(32)
    elif fault == "longer":  # the header promises more than follows
        length += rng.choice([1, 100, 1 << 16])
    elif fault == "shorter" and length:
        length -= rng.randrange(1, length + 1)
    elif fault == "oversized":
        return HEADER.pack(MAGIC, kind, RESERVED, rng.choice([(64 << 20) + 1, 1 << 30, 2**32 - 1]), 0)
    return HEADER.pack(magic, kind, reserved, length, crc) + payload


def payload_for(kind: int, env: Env, rng: random.Random) -> bytes:
    """A payload of the type a frame of ``kind`` carries (or a random one), defanged."""
    roll = rng.random()
    if kind == Kind.TOKEN:
        return rng.choice([b"", b"secret", rng.randbytes(40), "t\u00f6ken".encode()])
    if kind in (Kind.REPLY, Kind.ERROR) and roll < 0.7:
        return random_message(worker_pb2.DriveReply, rng, env).SerializeToString()
    if roll < 0.6:
        batch = rand_batch(env, rng)
        if kind in (Kind.HELLO_DRIVE, Kind.HELLO_FORWARD):
            batch = worker_pb2.ValueBatch(epoch=batch.epoch) if rng.random() < 0.7 else batch
    elif roll < 0.8:
        batch = random_message(worker_pb2.ValueBatch, rng, env)
    else:
        data = rng.randbytes(rng.choice([0, 1, 9, 200]))
        if rng.random() < 0.5:
            data = break_bytes(rand_batch(env, rng).SerializeToString(), rng)
        return _defanged(data, kind)
    return _defanged(batch.SerializeToString(), kind)


def _defanged(data: bytes, kind: int) -> bytes:
    try:
        batch = worker_pb2.ValueBatch.FromString(data)
    except DecodeError:
        return data
    before = batch.SerializeToString()
    _defang_batch(batch, hello_drive=kind == Kind.HELLO_DRIVE)
    after = batch.SerializeToString()
    return data if after == before else after


def relay_case(env: Env, rng: random.Random) -> RelayCase:
    worker = rng.choice(env.workers)
    roll = rng.random()
    if roll < 0.08:
        return RelayCase("relay/random-bytes", worker, rng.randbytes(rng.choice([0, 1, 15, 16, 17, 300, 5000])), [])
    if roll < 0.1:
        data = rng.choice([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                           b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"])  # HTTP/1, an HTTP/2 preface, TLS hello
        return RelayCase("relay/other-protocol", worker, data, [])
    kinds: list[int] = []
    opening = rng.choice(["drive", "forward", "token+drive", "token+forward", "token", "none", "drive+drive"])
    if "token" in opening:
        kinds.append(Kind.TOKEN)
    if "drive" in opening:
        kinds.append(Kind.HELLO_DRIVE)
    if "forward" in opening:
        kinds.append(Kind.HELLO_FORWARD)
    if opening == "drive+drive":
        kinds.append(Kind.HELLO_DRIVE)
    for _ in range(rng.choice([0, 1, 1, 2, 3, 6])):
        kinds.append(Kind.BATCH if rng.random() < 0.55 else rng.choice(list(Kind) + UNKNOWN_KINDS))
    faults = [rng.choice(HEADER_FAULTS) if rng.random() < 0.12 else None for _ in kinds]
    data = b"".join(frame(k, payload_for(k, env, rng), f, rng) for k, f in zip(kinds, faults))
    label = "relay/frames"
    if data and rng.random() < 0.15:
        data, label = data[:rng.randrange(len(data))], "relay/truncated"
    names = [Kind(k).name if k in Kind._value2member_map_ else f"UNKNOWN_{k}" for k in kinds]
    return RelayCase(label, worker, data, names)


def silent_cases(env: Env) -> list[RelayCase]:
    """Connections that never finish their hello: nothing at all, or half a header. The worker's
    hello timeout (HELLO_TIMEOUT_SECONDS) must close them."""
    partial = HEADER.pack(MAGIC, Kind.HELLO_FORWARD, RESERVED, 10, 0)[:7]
    return [RelayCase(label, w, data, [], hold_open=True) for w in env.workers
            for label, data in (("relay/silent", b""), ("relay/half-header", partial))]


@dataclass
class RelayOutcome:
    codes: list[str]  # error codes of the ERROR (or error REPLY) frames received, in order
    replies: int  # REPLY frames received
    end: str  # "eof" (the worker closed), "reset", "timeout" (still open at the deadline), "garbled", "refused"

    @property
    def key(self) -> str:
        if self.end in ("timeout", "garbled", "refused"):
            return {"timeout": "NO_ANSWER", "garbled": "GARBLED", "refused": "REFUSED"}[self.end]
        return self.codes[0] if self.codes else ("OK" if self.end == "eof" else "RESET")


def exchange(host: str, port: int, case: RelayCase, timeout: float) -> RelayOutcome:
    """Send the case's bytes, end our side (unless held open), read until the worker closes."""
    deadline = time.monotonic() + timeout
    buf, end = b"", "eof"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return RelayOutcome([], 0, "refused")  # the port is gone: the worker stopped serving
    with sock:
        try:
            sock.sendall(case.data)
            if not case.hold_open:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the worker closed first (it answered a broken frame): read what it sent
            end = "reset"
        try:
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (socket.timeout, TimeoutError):
            end = "timeout"
        except OSError:
            end = "reset"
    codes, replies, pos = [], 0, 0
    while pos + HEADER.size <= len(buf):
        magic, kind, _, length, _ = HEADER.unpack_from(buf, pos)
        if magic != MAGIC or kind not in (Kind.REPLY, Kind.ERROR):
            return RelayOutcome(codes, replies, "garbled")
        if pos + HEADER.size + length > len(buf):
            break
        reply = worker_pb2.DriveReply.FromString(buf[pos + HEADER.size:pos + HEADER.size + length])
        replies += kind == Kind.REPLY
        if reply.error_code:
            codes.append(reply.error_code)
        pos += HEADER.size + length
    # a frame cut short is garbled, unless a reset cut it (the kernel drops what was unread)
    return RelayOutcome(codes, replies, end if pos == len(buf) or end == "reset" else "garbled")


