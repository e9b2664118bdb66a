"""Random values for fuzzing (fuzz_cases.py builds requests from them): protobuf messages of any
type with every field drawn by its descriptor (extreme integers, non-finite floats, odd strings,
random bytes), one-field mutations, byte-level breakage of a serialization, and activations that
are nearly right (a dtype, shape or byte count off)."""

from __future__ import annotations

import math
import random
import struct

from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import Message

from edgeheads.v1 import tensor_pb2

DTYPES = ["float32", "float16", "bfloat16", "int64", "", "float64", "complex7", "FLOAT32", "int8"]
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}
STRINGS = ["", " ", "x0", "a", "attn(0,0)", "proj(0)", "ffn(1)", "attn(99,0)", "attn(0,99)", "proj(-1)", "ffn(",
           "attn(0,0,0)", "ffn(1e3)", "attn(\u0661,0)", "\x00", "caf\u00e9 \u6771\u4eac \U0001f642", "worker-0",
           "worker-1", "{}", "null", "[1, 2]", '{"arch": "bert"}', "../../etc/passwd", "%s%n%x", "tcp", "grpc",
           "127.0.0.1:1", "a" * 5000]
SIGNED = [0, 1, -1, 2, 7, 255, 65536, 2**31 - 1, -2**31, 2**32, 2**53 + 1, 2**63 - 1, -2**63]
UNSIGNED = [0, 1, 2, 3, 7, 64, 255, 65535, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-300, 5e-324, 1e308, 1e9, -1e9, math.inf, -math.inf, math.nan]
FLOAT32 = [0.0, -0.0, 3e38, -3e38, 1e-45, math.inf, -math.inf, math.nan]  # packable as float32
RESERVE = [0, 0, 0, 1, 16, 300, 2**40, 2**64 - 1]  # K/V reservations: none, small, past any budget
LIMITS = {F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_INT64: (-2**63, 2**63 - 1),
          F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_ENUM: (-2**31, 2**31 - 1)}


def rand_string(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(STRINGS)
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD800)]))
                   for _ in range(rng.randrange(1, 40)))


def rand_bytes(rng: random.Random, big: bool = False) -> bytes:
    n = rng.choice([0, 1, 3, 16, 100, 4096] + ([1 << 20] if big else []))
    return rng.randbytes(n)


def rand_scalar(f, rng: random.Random):
    t = f.type
    if t == F.TYPE_STRING:
        return rand_string(rng)
    if t == F.TYPE_BYTES:
        return rand_bytes(rng, big=rng.random() < 0.02)
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return rng.choice(FLOATS) if rng.random() < 0.8 else rng.uniform(-1e6, 1e6)
    lo, hi = LIMITS.get(t, (-2**63, 2**63 - 1))
    values = SIGNED if lo < 0 else UNSIGNED
    v = rng.choice(values) if rng.random() < 0.7 else rng.randrange(0, 100)
    return min(max(v, lo), hi)


def random_message(cls: type[Message], rng: random.Random, env=None, depth: int = 0) -> Message:
    """A message of ``cls`` with random fields set, by the descriptor."""
    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        if rng.random() < 0.45:
            continue
        try:
            _set_random(msg, f, rng, env, depth)
        except (ValueError, TypeError, OverflowError):
            pass  # a value the field type refuses (a float out of float32 range, say): leave it unset
    return msg


def _value(f, rng, env, depth):
    if f.type == F.TYPE_MESSAGE:
        if f.message_type.full_name == "edgeheads.v1.Tensor" and env is not None and rng.random() < 0.6:
            return rand_tensor(env, rng)
        return random_message(message_factory.GetMessageClass(f.message_type), rng, env, depth + 1)
    return rand_scalar(f, rng)


def _set_random(msg, f, rng, env, depth) -> None:
    if f.type == F.TYPE_MESSAGE and depth >= 3:
        return
    target = getattr(msg, f.name) if f.is_repeated else None
    if f.type == F.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
        key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        for _ in range(rng.choice([1, 2, 5])):
            key = rand_scalar(key_f, rng)
            if value_f.type == F.TYPE_MESSAGE:
                target[key].CopyFrom(_value(value_f, rng, env, depth))
            else:
                target[key] = rand_scalar(value_f, rng)
    elif f.is_repeated:
        for _ in range(rng.choice([1, 1, 2, 3, 10, 200] if f.type != F.TYPE_MESSAGE else [1, 2, 3, 8])):
            if f.type == F.TYPE_MESSAGE:
                target.add().CopyFrom(_value(f, rng, env, depth))
            else:
                target.append(rand_scalar(f, rng))
    elif f.type == F.TYPE_MESSAGE:
        getattr(msg, f.name).CopyFrom(_value(f, rng, env, depth))
    else:
        setattr(msg, f.name, rand_scalar(f, rng))


def mutate(msg: Message, rng: random.Random, env) -> None:
    """Re-randomize or clear one field somewhere in ``msg`` (in place)."""
    if not msg.DESCRIPTOR.fields:  # an empty request: only bytes can make it strange
        return
    f = rng.choice(msg.DESCRIPTOR.fields)
    if f.type == F.TYPE_MESSAGE and not f.is_repeated and msg.HasField(f.name) and rng.random() < 0.5:
        return mutate(getattr(msg, f.name), rng, env)
    if f.is_repeated and f.type == F.TYPE_MESSAGE and not f.message_type.GetOptions().map_entry \
            and len(getattr(msg, f.name)) and rng.random() < 0.5:
        return mutate(rng.choice(getattr(msg, f.name)), rng, env)
    msg.ClearField(f.name)
    if rng.random() < 0.8:
        try:
            _set_random(msg, f, rng, env, 1)
        except (ValueError, TypeError, OverflowError):
            pass


def break_bytes(data: bytes, rng: random.Random) -> bytes:
    """A valid serialization made invalid (or at least strange) at byte level."""
    how = rng.randrange(6)
    if how == 0 or not data:
        return rng.randbytes(rng.choice([1, 2, 5, 20, 300]))
    if how == 1:
        return data[:rng.randrange(len(data))]
    if how == 2:
        out = bytearray(data)
        for _ in range(rng.choice([1, 1, 3])):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if how == 3:
        return data + rng.randbytes(rng.choice([1, 7, 64]))
    if how == 4:  # a field tag with a wire type that does not fit, or a length past the end
        return rng.choice([b"\x0f", b"\x0a\xff\xff\xff\xff\x0f", b"\x08\x80", b"\x07\x00", b"\x0b"]) + data
    return data + data[:rng.randrange(len(data))]



def rand_tensor(env, rng: random.Random) -> tensor_pb2.Tensor:
    """Mostly an activation (1, T, D) with the bytes it needs (D: ``env.shape.hidden_size``); often a
    dtype, shape or byte count off."""
    dtype = "float32" if rng.random() < 0.6 else rng.choice(DTYPES)
    hidden = env.shape.hidden_size
    shape = rng.choice([[1, rng.choice([1, 2, 5]), hidden], [1, 1, hidden + 1], [1, 1], [], [0], [1, 0, hidden],
                        [1, -1, hidden], [-1], [2, 1, hidden], [1] * 70, [1, 2**40, hidden], [2**62, 4]])
    numel = math.prod(shape) if all(d >= 0 for d in shape) else 1
    size = ITEMSIZE.get(dtype, 4)
    n = numel * size if numel * size <= 1 << 20 else 64
    n = rng.choice([n, n, n, max(0, n - 1), n + size, 0])
    if dtype == "float32" and n % 4 == 0 and rng.random() < 0.5:
        data = struct.pack(f"<{n // 4}f", *(rng.gauss(0, 1) if rng.random() < 0.95 else rng.choice(FLOAT32)
                                            for _ in range(n // 4)))
    else:
        data = rng.randbytes(n)
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)
