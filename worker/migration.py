"""Block state for migration, as pure functions over a BlockHost: export a block's
weights (optional) and its K/V cache rows into one safetensors payload, and import
such a payload on the destination.

The payload holds ``w.<name>`` weight tensors, ``k.<session>`` and ``v.<session>``
cache rows from a per-session start position, and JSON metadata (UTF-8 bytes in the ``meta`` uint8 tensor) naming the block,
its content hash, the rows it carries per session, and every session the source
holds (so the destination forgets sessions the source has dropped). A pre-copy
sends everything; the delta at the switch sends only rows added since.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edgeheads.worker import telemetry
from edgeheads.worker.blocks.attention import AttentionBlock
from edgeheads.worker.blocks.kv_cache import DEFAULT_CAPACITY, store_bytes
from edgeheads.worker.host import BlockHost, HostError, parse_block_id
from edgeheads.common.wire import weights_to_blob

META = "meta"  # the uint8 tensor holding the JSON metadata; other names start with w., k. or v.


def export_state(host: BlockHost, block_text: str, include_weights: bool,
                 from_positions: dict[str, int]) -> bytes:
    """Rows ``from_positions.get(session, 0)..length`` of every session's cache."""
    block = host._block(block_text)
    tensors: dict[str, torch.Tensor] = {}
    if include_weights:
        tensors |= {f"w.{k}": v for k, v in block.weights.items()}
    rows: dict[str, list[int]] = {}
    capacity: dict[str, int] = {}  # rows allocated per session: the destination allocates as many
    sessions: list[str] = []
    if isinstance(block, AttentionBlock):
        sessions = sorted(block.caches)
        for session in sessions:
            cache = block.caches[session]
            # a destination ahead of us copied rows of a step that failed and was rolled back
            # here: resend from our length, and the import truncates its extra rows
            start = min(from_positions.get(session, 0), cache.length)
            k, v = cache.export(start)
            tensors[f"k.{session}"], tensors[f"v.{session}"] = k.cpu(), v.cpu()
            rows[session] = [start, cache.length]
            capacity[session] = cache.capacity
    meta = {"block_id": str(block.block_id), "content_hash": host.block_hash[block.block_id],
            "weights": include_weights, "rows": rows, "sessions": sessions, "capacity": capacity}
    tensors[META] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    return st_save({k: t.contiguous() for k, t in tensors.items()})


def parse_state(blob: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an export payload; INVALID_ARGUMENT when it is not one."""
    try:
        tensors = st_load(blob)  # validates the header and the byte ranges
        meta = json.loads(tensors.pop(META).numpy().tobytes())
        if not isinstance(meta.get("rows"), dict) or not isinstance(meta.get("sessions"), list):
            raise ValueError("rows or sessions missing")
    except Exception as err:  # safetensors and json raise their own types
        raise HostError("INVALID_ARGUMENT", f"not a block state payload: {err}") from None
    return meta, tensors


def import_state(host: BlockHost, blob: bytes, block_text: str, shape_json: str, content_hash: str) -> dict:
    """Apply an export payload to ``block_text`` on ``host``; the payload's metadata.

    Weights, when carried, must hash to ``content_hash``; otherwise the host must
    already hold that hash. A block not yet bound here is bound first. Cache rows land
    at their start position, which must not leave a gap."""
    meta, tensors = parse_state(blob)
    if meta.get("block_id") != block_text or meta.get("content_hash") != content_hash:
        raise HostError("INVALID_ARGUMENT", f"payload is for {meta.get('block_id')} "
                        f"({str(meta.get('content_hash'))[:12]}), not {block_text} ({content_hash[:12]})")
    if meta.get("weights"):
        weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
        host.add_weights(weights_to_blob(weights), content_hash)  # DATA_LOSS unless the hash matches
    block = host.blocks.get(parse_block_id(block_text))
    if block is None or host.block_hash.get(block.block_id) != content_hash:
        block = host.bind_block(block_text, shape_json, content_hash)
    if isinstance(block, AttentionBlock):
        capacity = import_capacity(meta, block)
        needed = sum(store_bytes(1, rows, block.shape.head_dim, block.dtype.itemsize) for rows in capacity.values())
        used = host.memory_used_bytes()
        budget = telemetry.memory_capacity_bytes(host.memory_limit_bytes, used)
        if used + needed > budget:
            raise HostError("RESOURCE_EXHAUSTED", f"{block_text}: the K/V caches of {len(capacity)} sessions need "
                            f"{needed} bytes on {host.name}, but {used} of its {budget}-byte budget are in use")
        for session, (start, stop) in meta["rows"].items():
            k, v = tensors[f"k.{session}"], tensors[f"v.{session}"]
            if k.shape[0] != stop - start or v.shape != k.shape:
                raise HostError("INVALID_ARGUMENT", f"session {session!r}: rows {start}..{stop} but "
                                f"{k.shape[0]} keys and {v.shape[0]} values")
            have = block.caches[session].length if session in block.caches else 0
            if start > have:
                raise HostError("FAILED_PRECONDITION", f"session {session!r}: rows start at {start} but "
                                f"{block_text} here has {have}")
            block.cache(session, capacity.get(session, DEFAULT_CAPACITY)).load(k.to(host.device), v.to(host.device),
                                                                               start)
        for session in set(block.caches) - set(meta["sessions"]):
            block.drop_session(session)
    return meta


def import_capacity(meta: dict, block: AttentionBlock) -> dict[str, int]:
    """Rows to allocate for each session the payload brings that ``block`` has no cache of yet:
    what the source allocated (its reservation), at least the rows it carries."""
    sent = meta.get("capacity")
    sent = sent if isinstance(sent, dict) else {}
    out = {}
    for session, span in meta["rows"].items():
        if session in block.caches:
            continue
        rows = sent.get(session)
        stop = span[1] if isinstance(span, list) and len(span) == 2 and isinstance(span[1], int) else 0
        out[session] = max(rows if isinstance(rows, int) and rows > 0 else DEFAULT_CAPACITY, stop)
    return out


def cache_lengths(host: BlockHost, block_text: str) -> dict[str, int]:
    """Tokens held per session for a block here (empty when the block is not here)."""
    block = host.blocks.get(parse_block_id(block_text))
    if not isinstance(block, AttentionBlock):
        return {}
    return {s: c.length for s, c in block.caches.items()}
