"""Block state export/import (worker/migration.py) between two real BlockHosts: a
pre-copy plus a delta leaves the destination's caches equal to the source's, so the
next step gives the same output on either; bad payloads are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save
from transformers import AutoModelForCausalLM

from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.worker.host import BlockHost, HostError, OpSpec
from edgeheads.worker.migration import cache_lengths, export_state, import_state, parse_state
from edgeheads.common.wire import sha256_hex, weights_to_blob
from tiny_configs import TINY_CONFIGS

BLOCK = "attn(1,1)"


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


def host_with(parts, name: str, blocks: list[str]) -> BlockHost:
    host = BlockHost(name)
    for block_id, weights in parts.blocks.items():
        if str(block_id) in blocks:
            blob = weights_to_blob(weights)
            host.add_weights(blob, sha256_hex(blob))
            host.bind_block(str(block_id), json.dumps(parts.shape.to_dict()), sha256_hex(blob))
    return host


def step(host: BlockHost, session: str, position: int, x: torch.Tensor) -> torch.Tensor:
    return host.run_call(session, position, {"x": x}, [OpSpec(BLOCK, ["x"], "a")], ["a"])["a"]


def digest(parts) -> str:
    return sha256_hex(weights_to_blob(next(w for b, w in parts.blocks.items() if str(b) == BLOCK)))


def test_precopy_then_delta_reproduces_every_session(parts):
    hidden = parts.shape.hidden_size
    src, dst = host_with(parts, "src", [BLOCK]), BlockHost("dst")
    shape_json = json.dumps(parts.shape.to_dict())
    torch.manual_seed(1)
    lengths = {"a": 0, "b": 0, "gone": 0}
    for session, n in [("a", 7), ("b", 3), ("gone", 2)]:
        step(src, session, 0, torch.randn(1, n, hidden))
        lengths[session] = n
    meta = import_state(dst, export_state(src, BLOCK, True, {}), BLOCK, shape_json, digest(parts))
    assert meta["weights"] and meta["rows"] == {"a": [0, 7], "b": [0, 3], "gone": [0, 2]}
    # decoding goes on at the source: new tokens, a new session, a finished one
    for session in ("a", "b"):
        step(src, session, lengths[session], torch.randn(1, 1, hidden))
        lengths[session] += 1
    step(src, "new", 0, torch.randn(1, 4, hidden))
    src.drop_session("gone")
    delta = export_state(src, BLOCK, False, cache_lengths(dst, BLOCK))
    meta, tensors = parse_state(delta)
    assert meta["rows"] == {"a": [7, 8], "b": [3, 4], "new": [0, 4]}  # only what is missing
    assert not any(k.startswith("w.") for k in tensors)
    import_state(dst, delta, BLOCK, shape_json, digest(parts))
    assert cache_lengths(dst, BLOCK) == cache_lengths(src, BLOCK) == {"a": 8, "b": 4, "new": 4}
    x = torch.randn(1, 1, hidden)
    for session, n in [("a", 8), ("b", 4), ("new", 4)]:
        assert torch.equal(step(src, session, n, x), step(dst, session, n, x))


def test_bad_payloads_are_refused_and_change_nothing(parts):
    src = host_with(parts, "src", [BLOCK, "attn(0,0)"])
    dst = BlockHost("dst")
    shape_json = json.dumps(parts.shape.to_dict())
    step(src, "s", 0, torch.randn(1, 3, parts.shape.hidden_size))
    payload = export_state(src, BLOCK, True, {})
    with pytest.raises(HostError) as err:  # the payload is for another block
        import_state(dst, payload, "attn(0,0)", shape_json, digest(parts))
    assert err.value.code == "INVALID_ARGUMENT"
    meta, tensors = parse_state(payload)
    meta_tensor = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    tampered = st_save({k: (v + 1 if k.startswith("w.") else v) for k, v in tensors.items()} | {"meta": meta_tensor})
    with pytest.raises(HostError) as err:  # weights that do not hash to what the head node expects
        import_state(dst, tampered, BLOCK, shape_json, digest(parts))
    assert err.value.code == "DATA_LOSS"
    with pytest.raises(HostError) as err:
        import_state(dst, payload[:-10], BLOCK, shape_json, digest(parts))
    assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(HostError) as err:  # no weights sent and none held
        import_state(dst, export_state(src, BLOCK, False, {}), BLOCK, shape_json, digest(parts))
    assert err.value.code == "NOT_FOUND"
    assert not dst.blocks and not dst.weights
    # a destination ahead of the source (it copied rows of a step that was rolled back) is cut back
    import_state(dst, payload, BLOCK, shape_json, digest(parts))
    src.blocks[next(b for b in src.blocks if str(b) == BLOCK)].caches["s"].length = 2  # the rollback
    import_state(dst, export_state(src, BLOCK, False, cache_lengths(dst, BLOCK)), BLOCK, shape_json, digest(parts))
    assert cache_lengths(dst, BLOCK) == {"s": 2}


def test_rebinding_a_block_to_other_content_frees_the_old_weights(parts):
    """A head node restarted in another format binds every block to new content: the old content
    goes, unless another block still uses it (a worker kept both before, uncounted)."""
    from edgeheads.headnode.parts_format import convert_parts

    host = host_with(parts, "w", [BLOCK])
    old = digest(parts)
    bf16 = convert_parts(parts, "bf16", torch.bfloat16)
    blob = weights_to_blob(next(w for b, w in bf16.blocks.items() if str(b) == BLOCK))
    host.add_weights(blob, sha256_hex(blob))
    host.bind_block(BLOCK, json.dumps(bf16.shape.to_dict()), sha256_hex(blob))
    assert host.has_weights([old, sha256_hex(blob)]) == [sha256_hex(blob)]
    # two blocks on one content: rebinding one keeps it for the other
    shared = BlockHost("s")
    weights = next(w for b, w in parts.blocks.items() if str(b) == BLOCK)
    first = weights_to_blob(weights)
    shared.add_weights(first, sha256_hex(first))
    for text in (BLOCK, "attn(1,0)"):
        shared.bind_block(text, json.dumps(parts.shape.to_dict()), sha256_hex(first))
    shared.add_weights(blob, sha256_hex(blob))
    shared.bind_block(BLOCK, json.dumps(bf16.shape.to_dict()), sha256_hex(blob))
    assert shared.has_weights([sha256_hex(first)]) == [sha256_hex(first)]
