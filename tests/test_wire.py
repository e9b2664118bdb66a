"""Tensors on the wire: exact round trips for every dtype, and clear errors for bad messages."""

import pytest
import torch

from edgeheads.v1 import tensor_pb2, worker_pb2
from edgeheads.common.wire import WireError, fill_tensor_proto, tensor_from_proto, tensor_to_proto


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip_is_bit_exact(dtype):
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    back = tensor_from_proto(tensor_pb2.Tensor.FromString(tensor_to_proto(t).SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8) if dtype.is_floating_point else back,
                       t.view(torch.uint8) if dtype.is_floating_point else t)


def test_non_contiguous_tensors_are_sent_in_logical_order():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    assert torch.equal(tensor_from_proto(tensor_to_proto(t)), t)


def test_fill_in_place_inside_a_batch():
    batch = worker_pb2.ValueBatch(session="s", epoch=1, position=4)
    x = torch.randn(1, 2, 8)
    nt = batch.values.add(name="x")
    fill_tensor_proto(nt.tensor, x)
    parsed = worker_pb2.ValueBatch.FromString(batch.SerializeToString())
    assert parsed.values[0].name == "x"
    assert torch.equal(tensor_from_proto(parsed.values[0].tensor), x)


def test_received_tensor_owns_its_memory():
    p = tensor_to_proto(torch.zeros(4))
    t = tensor_from_proto(p)
    t += 1  # writable, and not aliasing the message's bytes
    assert tensor_from_proto(p).sum().item() == 0


def test_empty_tensor():
    t = tensor_from_proto(tensor_to_proto(torch.empty(0, 3)))
    assert t.shape == (0, 3)


@pytest.mark.parametrize("message, error", [
    (tensor_pb2.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "unknown dtype"),
    (tensor_pb2.Tensor(dtype="float32", shape=[-1, 2], data=b""), "negative dimension"),
    (tensor_pb2.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), "needs 24 bytes, got 20"),
])
def test_malformed_tensors_are_rejected(message, error):
    with pytest.raises(WireError, match=error):
        tensor_from_proto(message, "x")


def test_unsupported_dtype_cannot_be_sent():
    with pytest.raises(WireError, match="cannot be sent"):
        tensor_to_proto(torch.zeros(2, dtype=torch.float64))
