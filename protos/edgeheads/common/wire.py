"""Tensors and large payloads on the wire (pure functions, no gRPC calls).

- A tensor travels as {dtype, shape, raw little-endian bytes}; nothing is ever unpickled.
- A block's weights travel as a safetensors blob (also dtype + shape + raw bytes) whose
  sha256 is the block's content hash: the same weights always give the same hash.
- Anything larger than one chunk travels as a stream of Chunk messages; the last one
  carries the sha256 of the whole, which the receiver checks.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edgeheads.v1 import tensor_pb2

if sys.byteorder != "little":  # pragma: no cover - every supported board is little-endian
    raise ImportError("edgeheads' wire format is little-endian; this host is big-endian")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_CHUNK_BYTES = 1 << 20


class WireError(ValueError):
    """A malformed tensor or payload (maps to INVALID_ARGUMENT)."""


class DataLossError(WireError):
    """A truncated or corrupted chunked payload (maps to DATA_LOSS)."""


def tensor_to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    msg = tensor_pb2.Tensor()
    fill_tensor_proto(msg, t)
    return msg


def fill_tensor_proto(msg: tensor_pb2.Tensor, t: torch.Tensor) -> None:
    """Write ``t`` into an empty Tensor message in place (building a message inside its
    parent avoids protobuf copying it in; this runs once per value per relay hop)."""
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise WireError(f"dtype {t.dtype} cannot be sent; supported: {sorted(DTYPES)}")
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.contiguous().cpu()
    msg.dtype = name
    msg.shape.extend(t.shape)
    # numpy has no bfloat16: those go through a byte view (the same little-endian bytes)
    msg.data = (t.numpy() if t.dtype is not torch.bfloat16 else t.reshape(-1).view(torch.uint8).numpy()).tobytes()


def tensor_from_proto(p: tensor_pb2.Tensor, name: str = "tensor") -> torch.Tensor:
    """Decode and validate: known dtype, non-negative shape, byte count matching the shape."""
    dtype = DTYPES.get(p.dtype)
    if dtype is None:
        raise WireError(f"{name}: unknown dtype {p.dtype!r}; supported: {sorted(DTYPES)}")
    shape = tuple(p.shape)
    numel = 1
    for d in shape:
        if d < 0:
            raise WireError(f"{name}: negative dimension in shape {list(shape)}")
        numel *= d
    data = p.data
    if len(data) != numel * dtype.itemsize:
        raise WireError(f"{name}: shape {list(shape)} of {p.dtype} needs {numel * dtype.itemsize} bytes, "
                        f"got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


def sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def weights_to_blob(weights: dict[str, torch.Tensor]) -> bytes:
    """A deterministic safetensors serialization of one block's weights."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in sorted(weights.items())})


def blob_to_weights(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return dict(st_load(blob))
    except Exception as err:  # safetensors raises its own error types
        raise WireError(f"not a valid safetensors payload: {err}") from err


def chunks(blob: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tensor_pb2.Chunk]:
    """Split a payload into Chunk messages; the last one carries the sha256 of the whole."""
    total = len(blob)
    digest = sha256_hex(blob)
    view = memoryview(blob)
    offset = 0
    while True:
        end = min(total, offset + chunk_bytes)
        last = end == total
        yield tensor_pb2.Chunk(offset=offset, data=bytes(view[offset:end]), total_bytes=total, last=last,
                               sha256=digest if last else "")
        if last:
            return
        offset = end


class ChunkAssembler:
    """Reassembles a chunked payload, checking order, size and checksum."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buffer = bytearray()
        self.total: int | None = None
        self.done = False
        self.sha256 = ""

    def add(self, chunk: tensor_pb2.Chunk) -> None:
        if self.done:
            raise WireError("chunk received after the last chunk")
        if chunk.offset != len(self.buffer):
            raise DataLossError(f"chunk at offset {chunk.offset}, expected {len(self.buffer)} (lost or reordered)")
        if self.total is None:
            if chunk.total_bytes > self.max_bytes:
                raise WireError(f"payload of {chunk.total_bytes} bytes exceeds the limit of {self.max_bytes}")
            self.total = chunk.total_bytes
        elif chunk.total_bytes != self.total:
            raise DataLossError("total_bytes changed in the middle of a stream")
        self.buffer += chunk.data
        if len(self.buffer) > self.total:
            raise DataLossError(f"received {len(self.buffer)} bytes, more than the announced {self.total}")
        if chunk.last:
            self.done = True
            self.sha256 = chunk.sha256

    def finish(self) -> bytes:
        """The whole payload; DataLossError if the stream ended early or the checksum fails."""
        if not self.done or self.total is None:
            raise DataLossError(f"stream ended after {len(self.buffer)} bytes without its last chunk")
        if len(self.buffer) != self.total:
            raise DataLossError(f"received {len(self.buffer)} of {self.total} bytes")
        blob = bytes(self.buffer)
        if sha256_hex(blob) != self.sha256:
            raise DataLossError("checksum mismatch: the payload was corrupted in transit")
        return blob
