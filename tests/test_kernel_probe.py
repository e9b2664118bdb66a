"""Kernel choice by measurement (worker/kernel_probe.py) and the install-time check that a
worker can run a format (kernels.check_runnable, BlockHost.bind_block)."""

from __future__ import annotations

import json

import pytest
import torch

from edgeheads.common.formats import convert
from edgeheads.common.spec import BlockId, BlockKind, ModelShape
from edgeheads.common.wire import sha256_hex, weights_to_blob
from edgeheads.worker import kernel_probe, kernels
from edgeheads.worker.host import BlockHost, HostError


@pytest.fixture
def fresh_choices(monkeypatch):
    """Each test starts with no kernel chosen, no probe done and no runnable verdicts."""
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_runnable", {})
    monkeypatch.setattr(kernel_probe, "_done", {})
    monkeypatch.delenv(kernel_probe.ENV, raising=False)


def test_pins_are_parsed_and_bad_ones_name_the_known_pairs():
    assert kernel_probe.pinned("q4=dequant, int8=int8pack") == {"q4": "dequant", "int8": "int8pack"}
    assert kernel_probe.pinned("") == {}
    for bad in ("q4=fast", "q5=dequant", "q4"):
        with pytest.raises(kernels.UnrunnableFormat, match="q4=int4pack"):
            kernel_probe.pinned(bad)


def test_the_probe_keeps_the_preferred_kernel_within_the_margin_and_drops_a_slow_one(fresh_choices, monkeypatch):
    timings = {("int8", "int8pack"): 1.4, ("int8", "dequant"): 1.0,   # within 1.5x: the preferred one stays
               ("q4", "int4pack"): 2.0, ("q4", "dequant"): 1.0}       # beyond: the faster one wins
    monkeypatch.setattr(kernel_probe, "time_kernel", lambda fmt, kernel, dtype, device="cpu": timings[fmt, kernel])
    assert kernel_probe.select_kernels(torch.bfloat16) == {"int8": "int8pack", "q4": "dequant"}
    assert kernels.kernel_for("q4", torch.bfloat16) == "dequant"
    assert kernels.kernel_for("q4", torch.float32) == "int4pack"  # another dtype: not probed yet, the default


def test_pins_win_over_measurement(fresh_choices, monkeypatch):
    monkeypatch.setenv(kernel_probe.ENV, "q4=dequant")
    choice = kernel_probe.select_kernels(torch.float32)
    assert choice["q4"] == "dequant" and kernels.kernel_for("q4", torch.float32) == "dequant"
    assert choice["int8"] in kernels.KERNELS["int8"]


def test_real_probe_picks_a_kernel_that_computes_the_product(fresh_choices):
    choice = kernel_probe.select_kernels(torch.bfloat16)
    weight = torch.randn(64, 128) * 0.05
    x = torch.randn(1, 128).bfloat16()
    for fmt, kernel in choice.items():
        w = convert({"o.weight": weight}, fmt, torch.bfloat16)
        want = torch.nn.functional.linear(x.float(), kernels.dequantize(w, "o.weight", torch.float32))
        got = kernels.linear(x, w, "o.weight").float()
        assert (got - want).abs().max() <= 0.05 * want.abs().max(), (fmt, kernel)


def _proj_blob(fmt: str) -> tuple[BlockId, str, bytes]:
    shape = ModelShape(arch="llama", n_layers=1, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
                       intermediate_size=128, vocab_size=100, bytes_per_param=2, dtype="bf16")
    weights = convert({"o.weight": torch.randn(shape.hidden_size, shape.n_heads * shape.head_dim) * 0.05},
                      fmt, torch.bfloat16)
    return BlockId(0, BlockKind.PROJECTION), json.dumps(shape.to_dict()), weights_to_blob(weights)


def test_a_worker_refuses_at_install_a_format_it_cannot_compute(fresh_choices, monkeypatch):
    def wrong(x, weights, name, bias=None):  # a kernel that runs but gives wrong values
        return kernels.dequant_linear(x, weights, name, bias) + 1.0

    monkeypatch.setitem(kernels.KERNELS, "q4", {**kernels.KERNELS["q4"], "wrong": wrong})
    monkeypatch.setenv(kernel_probe.ENV, "q4=wrong")
    host = BlockHost("w0")
    block_id, shape_json, blob = _proj_blob("q4")
    host.add_weights(blob, sha256_hex(blob))
    with pytest.raises(HostError) as err:
        host.bind_block(str(block_id), shape_json, sha256_hex(blob))
    assert err.value.code == "FAILED_PRECONDITION"
    assert "q4" in str(err.value) and "wrong values" in str(err.value)
    assert block_id not in host.blocks
    # the same host still takes a format it can run
    block_id, shape_json, blob = _proj_blob("int8")
    host.add_weights(blob, sha256_hex(blob))
    assert host.bind_block(str(block_id), shape_json, sha256_hex(blob)).weight_bytes < 64 * 64 * 2  # int8: < bf16
