"""The relay data plane's frames: round trips, and each kind of damage gets its status."""

from __future__ import annotations

import asyncio
import struct

import pytest
import torch

from edgeheads.v1 import tensor_pb2, worker_pb2
from edgeheads.common.relay_wire import (
    HEADER, FrameError, Kind, encode, encode_message, error_frame, parse, read_frame, relay_address)
from edgeheads.common.wire import tensor_from_proto, tensor_to_proto

LIMIT = 1 << 20


def read_all(data: bytes, limit: int = LIMIT) -> list[tuple[Kind, bytes] | None]:
    """Every frame read from a stream holding ``data`` and then EOF; a FrameError ends the list."""
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out = []
        while True:
            frame = await read_frame(reader, limit)
            out.append(frame)
            if frame is None:
                return out
    return asyncio.run(go())


def batch(x: torch.Tensor) -> worker_pb2.ValueBatch:
    return worker_pb2.ValueBatch(session="s", epoch=3, position=7, path_compute_seconds=0.25,
                                 values=[tensor_pb2.NamedTensor(name="x0", tensor=tensor_to_proto(x))])


def test_frames_round_trip_in_order_and_end_cleanly():
    x = torch.randn(1, 2, 576)
    data = (encode_message(Kind.HELLO_FORWARD, worker_pb2.ValueBatch(epoch=3)) + encode_message(Kind.BATCH, batch(x))
            + encode(Kind.BATCH, b""))
    frames = read_all(data)
    assert [f[0] for f in frames[:-1]] == [Kind.HELLO_FORWARD, Kind.BATCH, Kind.BATCH] and frames[-1] is None
    assert parse(worker_pb2.ValueBatch, frames[0][1]).epoch == 3
    got = parse(worker_pb2.ValueBatch, frames[1][1])
    assert (got.session, got.epoch, got.position, got.path_compute_seconds) == ("s", 3, 7, 0.25)
    assert torch.equal(tensor_from_proto(got.values[0].tensor, "x0"), x)
    assert parse(worker_pb2.ValueBatch, frames[2][1]) == worker_pb2.ValueBatch()


def test_an_empty_stream_is_a_clean_end():
    assert read_all(b"") == [None]


@pytest.mark.parametrize("damage,code,words", [
    (lambda f: b"XXXX" + f[4:], "INVALID_ARGUMENT", "not an edgeheads relay frame"),
    (lambda f: f[:4] + bytes([9]) + f[5:], "INVALID_ARGUMENT", "unknown relay frame kind 9"),
    (lambda f: f[:-1] + bytes([f[-1] ^ 1]), "DATA_LOSS", "checksum mismatch"),
    (lambda f: f[:HEADER.size - 3], "DATA_LOSS", "inside a frame header"),
    (lambda f: f[:-10], "DATA_LOSS", "bytes into a"),
    (lambda f: f[:8] + struct.pack("<I", LIMIT + 1) + f[12:], "RESOURCE_EXHAUSTED", "exceeds the limit"),
])
def test_damaged_frames_get_their_status(damage, code, words):
    good = encode_message(Kind.BATCH, batch(torch.randn(1, 1, 64)))
    with pytest.raises(FrameError, match=words) as info:
        read_all(damage(good))
    assert info.value.code == code


def test_the_frame_before_the_damage_still_arrives():
    good = encode_message(Kind.BATCH, batch(torch.randn(1, 1, 8)))
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(good + good[:-1] + bytes([good[-1] ^ 0x80]))
        reader.feed_eof()
        first = await read_frame(reader, LIMIT)
        with pytest.raises(FrameError):
            await read_frame(reader, LIMIT)
        return first
    assert asyncio.run(go())[0] is Kind.BATCH


def test_a_payload_that_is_not_the_message_is_invalid_argument():
    with pytest.raises(FrameError, match="not a valid ValueBatch") as info:
        parse(worker_pb2.ValueBatch, b"\xff\xff\xff\xff")
    assert info.value.code == "INVALID_ARGUMENT"


def test_error_frames_carry_the_status_and_the_step():
    kind, payload = read_all(error_frame("DATA_LOSS", "boom", batch(torch.zeros(1))))[0]
    reply = parse(worker_pb2.DriveReply, payload)
    assert kind is Kind.ERROR
    assert (reply.error_code, reply.error_message, reply.session, reply.epoch, reply.position) == (
        "DATA_LOSS", "boom", "s", 3, 7)
    assert not parse(worker_pb2.DriveReply, read_all(error_frame("INTERNAL", "x"))[0][1]).session


@pytest.mark.parametrize("address,host", [("10.0.0.5:50061", "10.0.0.5"), ("[::1]:50061", "::1"),
                                          ("pi-3.local:7000", "pi-3.local")])
def test_the_relay_port_is_dialled_on_the_grpc_host(address, host):
    assert relay_address(address, 40123) == (host, 40123)
