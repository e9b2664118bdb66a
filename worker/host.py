"""The state of one worker: block weights (content-addressed), blocks, per-session
caches, and the call interpreter. No gRPC here; worker/service.py adapts it.

Errors carry the gRPC status they map to, so bad requests get a precise status
and leave everything else on the worker untouched.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from edgeheads.worker.blocks.attention import AttentionBlock
from edgeheads.worker.blocks.base import Block, BlockShapeError
from edgeheads.worker.blocks.factory import make_block
from edgeheads.worker.kernel_probe import select_kernels
from edgeheads.worker.kernels import UnrunnableFormat, check_runnable, formats_in
from edgeheads.worker.cache_guard import cache_shortfall
from edgeheads.worker.cpu_share import effective_seconds
from edgeheads.worker.executor import FUSED_NAMES, CallUnit, pack_attention_weights, plan_units
from edgeheads.common.spec import BlockId, BlockKind, ModelShape
from edgeheads.common.wire import DataLossError, WireError, blob_to_weights, sha256_hex

log = logging.getLogger(__name__)

ENDED_SESSIONS_KEPT = 65536  # ids of ended sessions a worker refuses (about 5 MiB)


class HostError(Exception):
    """``code`` is a grpc.StatusCode name: NOT_FOUND, INVALID_ARGUMENT, ..."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_name(err: Exception) -> str:
    """The grpc.StatusCode name for a HostError or a wire error."""
    if isinstance(err, HostError):
        return err.code
    return "DATA_LOSS" if isinstance(err, DataLossError) else "INVALID_ARGUMENT"


@functools.lru_cache(maxsize=4096)
def _parse_block_id(text: str) -> BlockId:
    return BlockId.parse(text)


def parse_block_id(text: str) -> BlockId:
    try:
        return _parse_block_id(text)
    except ValueError as err:
        raise HostError("INVALID_ARGUMENT", str(err)) from None


def parse_shape(text: str) -> ModelShape:
    try:
        return ModelShape.from_json(text)
    except ValueError as err:
        raise HostError("INVALID_ARGUMENT", f"bad model shape: {err}") from None


@dataclass
class OpSpec:
    block_id: str
    inputs: list[str]
    output: str


@dataclass
class CompiledCall:
    """Ops checked against the blocks held at ``version`` of the host's block table."""
    ops: list[OpSpec]
    returns: list[str]
    blocks: list[Block]
    version: int
    units: list[CallUnit]


class BlockHost:
    def __init__(self, name: str, memory_limit_bytes: int | None = None, device: str = "cpu") -> None:
        self.name = name
        self.memory_limit_bytes = memory_limit_bytes
        self.device = torch.device(device)
        self.weights: dict[str, dict[str, torch.Tensor]] = {}  # content hash -> tensors
        self.blocks: dict[BlockId, Block] = {}
        self.block_hash: dict[BlockId, str] = {}
        self.compute_seconds = 0.0
        self.flops_done = 0.0
        # the cores its CPU quota allows (worker/cpu_share.py; the daemon reads it at every
        # report): block timings are charged max(wall, thread CPU / cores); None: wall time
        self.cores: float | None = None
        self.charged_seconds = 0.0  # calls as charged, cumulative (ComputeEstimate)
        # decode work by block kind ("attn", "proj", "ffn"): [FLOPs, seconds], cumulative;
        # what the controller's cost model is calibrated from (controller/calibration.py)
        self.kind_work: dict[str, list[float]] = {}
        self._version = 0  # bumped whenever self.blocks changes
        self.ended: OrderedDict[str, None] = OrderedDict()  # sessions the head node ended (end_session)
        self.last_used: dict[str, float] = {}  # session -> time.monotonic() of its last call (worker/idle_sessions.py)

    # ------------------------------------------------------------------ weights and blocks
    def has_weights(self, hashes: list[str]) -> list[str]:
        return [h for h in hashes if h in self.weights]

    def add_weights(self, blob: bytes, content_hash: str) -> None:
        if sha256_hex(blob) != content_hash:
            raise HostError("DATA_LOSS", "weights do not match their content hash")
        try:
            tensors = blob_to_weights(blob)
        except WireError as err:
            raise HostError("INVALID_ARGUMENT", str(err)) from None
        self.weights[content_hash] = {k: v.to(self.device) for k, v in tensors.items()}

    def bind_block(self, block_text: str, shape_json: str, content_hash: str) -> Block:
        """Make block ``block_text`` from weights already held under ``content_hash``."""
        block_id, shape = parse_block_id(block_text), parse_shape(shape_json)
        if content_hash not in self.weights:
            raise HostError("NOT_FOUND", f"{block_id}: no weights with hash {content_hash[:12]} on {self.name}")
        try:  # a dict of its own: packing replaces tensors of this block only
            block = make_block(block_id, shape, dict(self.weights[content_hash]))
        except (BlockShapeError, ValueError) as err:
            raise HostError("INVALID_ARGUMENT", str(err)) from None
        try:
            select_kernels(block.dtype, self.device.type, formats_in(block.weights))
            check_runnable(block.weights, block.dtype)
        except UnrunnableFormat as err:
            raise HostError("FAILED_PRECONDITION", f"{block_id} on {self.name}: {err}") from None
        old = self.blocks.get(block_id)
        extra = block.weight_bytes - (old.weight_bytes if old else 0)
        if self.memory_limit_bytes is not None and self.memory_used_bytes() + extra > self.memory_limit_bytes:
            raise HostError("RESOURCE_EXHAUSTED", f"{block_id}: {block.weight_bytes} more bytes exceed "
                            f"{self.name}'s memory limit of {self.memory_limit_bytes}")
        self.blocks[block_id] = block
        self._version += 1
        replaced = self.block_hash.get(block_id)
        self.block_hash[block_id] = content_hash
        if replaced not in (None, content_hash) and replaced not in self.block_hash.values():
            del self.weights[replaced]  # rebound to other content (a head node restarted in another format)
        if isinstance(block, AttentionBlock):
            self._pack_layer(block_id.layer)
        log.info("worker %s: loaded %s (%d bytes)", self.name, block_id, block.weight_bytes)
        return block

    def unload(self, block_texts: list[str]) -> list[str]:
        done = []
        layers = set()
        for text in block_texts:
            block_id = parse_block_id(text)
            if self.blocks.pop(block_id, None) is not None:
                self._version += 1
                self.block_hash.pop(block_id)
                done.append(text)
                if block_id.kind is BlockKind.ATTENTION:
                    layers.add(block_id.layer)
        for layer in sorted(layers):  # the rest of the layer's groups in a buffer without the freed rows
            self._pack_layer(layer)
        live = set(self.block_hash.values())
        for h in [h for h in self.weights if h not in live]:
            del self.weights[h]
        return done

    def _pack_layer(self, layer: int) -> None:
        """Lay the q/k/v weights of this layer's attention blocks here out adjacently, in group
        order, so that a call runs them as one matmul (see worker/executor.py). The content
        store follows, so the old per-block tensors are freed."""
        sets: dict[tuple, list[AttentionBlock]] = {}
        for block_id in sorted(b for b in self.blocks if b.layer == layer and b.kind is BlockKind.ATTENTION):
            block = self.blocks[block_id]
            sets.setdefault((block.norm_key, block.shape, block.dtype), []).append(block)  # type: ignore[arg-type]
        for blocks in sets.values():
            if pack_attention_weights(blocks):
                self._version += 1
                for block in blocks:
                    held = self.weights[self.block_hash[block.block_id]]
                    held.update({n: block.weights[n] for n in FUSED_NAMES if n in block.weights})

    def memory_used_bytes(self) -> int:
        """Weights of hosted blocks plus the bytes allocated for caches (a store shared by
        several blocks' caches counts once, whole)."""
        used = sum(b.weight_bytes for b in self.blocks.values())
        stores = {id(c.store): c.store for b in self.blocks.values() if isinstance(b, AttentionBlock)
                  for c in b.caches.values()}
        return used + sum(t.numel() * t.element_size() for t in stores.values())

    def cache_valid_bytes(self) -> int:
        """Bytes of the valid cache rows held (what migrating every block would move)."""
        return sum(c.valid_bytes for b in self.blocks.values() if isinstance(b, AttentionBlock)
                   for c in b.caches.values())

    def sessions(self) -> set[str]:
        return {s for b in self.blocks.values() if isinstance(b, AttentionBlock) for s in b.caches}

    def end_session(self, session: str) -> int:
        """The head node ended ``session``: drop its caches and refuse it from now on, so a call
        or relay batch still in flight cannot bring its caches back (session ids are single-use
        uuids). The newest ENDED_SESSIONS_KEPT ended ids are remembered. Caches dropped."""
        self.ended[session] = None
        self.ended.move_to_end(session)
        while len(self.ended) > ENDED_SESSIONS_KEPT:
            self.ended.popitem(last=False)
        return self.drop_session(session)

    def check_live(self, session: str) -> None:
        if session in self.ended:
            raise HostError("FAILED_PRECONDITION", f"session {session!r} has ended on {self.name}")

    def touch(self, session: str) -> None:
        """A call of ``session`` starts or ends: it is not idle (worker/idle_sessions.py)."""
        self.last_used[session] = time.monotonic()

    def drop_session(self, session: str) -> int:
        self.last_used.pop(session, None)
        dropped = 0
        for block in self.blocks.values():
            if isinstance(block, AttentionBlock) and session in block.caches:
                block.drop_session(session)
                dropped += 1
        return dropped

    # ------------------------------------------------------------------ calls
    def _block(self, text: str) -> Block:
        block_id = parse_block_id(text)
        block = self.blocks.get(block_id)
        if block is None:
            raise HostError("NOT_FOUND", f"block {block_id} is not on worker {self.name}")
        return block

    def compile_call(self, ops: list[OpSpec], input_names, returns: list[str]) -> CompiledCall:
        """The checks that depend only on the ops and the blocks held: done once per
        program segment in relay mode, per request otherwise."""
        if not ops:
            raise HostError("INVALID_ARGUMENT", "call has no ops")
        blocks = [self._block(op.block_id) for op in ops]
        known = set(input_names)
        for op, block in zip(ops, blocks):
            for name in op.inputs:
                if name not in known:
                    raise HostError("INVALID_ARGUMENT", f"{block.block_id}: input {name!r} is neither a request "
                                    "input nor an earlier op's output")
            expected = {BlockKind.ATTENTION: 1, BlockKind.FFN: 1}.get(block.block_id.kind)
            if expected is not None and len(op.inputs) != expected:
                raise HostError("INVALID_ARGUMENT", f"{block.block_id} takes 1 input, got {len(op.inputs)}")
            if block.block_id.kind is BlockKind.PROJECTION and len(op.inputs) < 2:
                raise HostError("INVALID_ARGUMENT", f"{block.block_id} takes the residual and the head outputs")
            known.add(op.output)
        for name in returns:
            if name not in known:
                raise HostError("INVALID_ARGUMENT", f"cannot return {name!r}: nothing produces it")
        return CompiledCall(ops, returns, blocks, self._version, plan_units(ops, blocks))

    def _check_request(self, session: str, position: int, inputs: dict[str, torch.Tensor],
                       compiled: CompiledCall) -> None:
        """The per-request checks, all before anything runs, so a bad request changes nothing."""
        if not session:
            raise HostError("INVALID_ARGUMENT", "empty session id")
        self.check_live(session)
        if compiled.version != self._version:  # blocks were loaded or unloaded since it was compiled
            compiled.blocks = [self._block(op.block_id) for op in compiled.ops]
            compiled.units = plan_units(compiled.ops, compiled.blocks)
            compiled.version = self._version
        for block in compiled.blocks:
            if isinstance(block, AttentionBlock):
                cache = block.caches.get(session)
                if cache is None and position > 0:
                    raise HostError("NOT_FOUND", f"{block.block_id}: unknown session {session!r} on {self.name}")
                have = cache.length if cache else 0
                if have != position:
                    raise HostError("FAILED_PRECONDITION", f"{block.block_id}: session {session!r} has {have} "
                                    f"cached tokens, request is at position {position}")
        lengths = {t.shape[1] if t.dim() == 3 else -1 for t in inputs.values()}
        if len(lengths) > 1:
            raise HostError("INVALID_ARGUMENT", "request inputs cover different numbers of tokens")
        self.touch(session)

    def run_call(self, session: str, position: int, inputs: dict[str, torch.Tensor], ops: list[OpSpec],
                  returns: list[str], reserve_tokens: int = 0) -> dict[str, torch.Tensor]:
        """Run ops in order over a value table seeded with ``inputs``; return ``returns``.

        Attention caches advance only if the whole call succeeds. A session's caches are
        allocated for ``reserve_tokens`` tokens at once (its reservation; 0: grow as needed),
        unless that would exceed this worker's memory budget (RESOURCE_EXHAUSTED)."""
        return self.run_compiled(session, position, inputs, self.compile_call(ops, inputs, returns), reserve_tokens)

    def run_compiled(self, session: str, position: int, inputs: dict[str, torch.Tensor],
                     compiled: CompiledCall, reserve_tokens: int = 0) -> dict[str, torch.Tensor]:
        self._check_request(session, position, inputs, compiled)
        fed = next((t.shape[1] for t in inputs.values() if t.dim() == 3), 1)
        shortfall = cache_shortfall(self, compiled.units, session, position + fed, reserve_tokens)
        if shortfall is not None:
            raise HostError("RESOURCE_EXHAUSTED", shortfall)
        blocks, returns = compiled.blocks, compiled.returns
        values = dict(inputs) if self.device.type == "cpu" else {k: v.to(self.device) for k, v in inputs.items()}
        touched: list[AttentionBlock] = []
        start, cpu_start = time.perf_counter(), time.thread_time()
        timed: list[tuple[CallUnit, float]] = []  # decode calls only: prefill runs at another rate
        try:
            with torch.inference_mode():
                for unit in compiled.units:
                    began = time.perf_counter()
                    if unit.group is not None:
                        touched += unit.group.blocks
                        parts = unit.group.split(unit.group.forward(session, values[unit.inputs[0]], reserve_tokens))
                        values.update(zip(unit.outputs, parts))
                    elif unit.block.block_id.kind is BlockKind.PROJECTION:
                        args = [values[n] for n in unit.inputs]
                        values[unit.outputs[0]] = unit.block.forward(torch.cat(args[1:], dim=-1), args[0])
                    else:
                        values[unit.outputs[0]] = unit.block.forward(values[unit.inputs[0]])
                    if fed == 1:
                        timed.append((unit, time.perf_counter() - began))
        except (BlockShapeError, ValueError, RuntimeError) as err:
            for block in touched:  # roll the caches back to where the request found them
                cache = block.caches.get(session)
                if cache is not None:
                    cache.length = position
                    if position == 0:
                        block.drop_session(session)
            raise HostError("RESOURCE_EXHAUSTED" if isinstance(err, torch.OutOfMemoryError) else "INVALID_ARGUMENT",
                            str(err)) from None
        wall = time.perf_counter() - start
        self.compute_seconds += wall
        self.touch(session)  # a call longer than the TTL must not leave its session looking idle
        first = next(iter(values.values()), None)
        tokens = first.shape[1] if first is not None and first.dim() == 3 else 1
        self.flops_done += tokens * sum(b.flops_decode(position + tokens) for b in blocks)
        # the call's own overhead between the units (lookups, the cache guard) is the blocks'
        # cost too: each unit carries a share in proportion to its time
        spent = sum(seconds for _, seconds in timed)
        charged = wall if self.cores is None else effective_seconds(wall, time.thread_time() - cpu_start, self.cores)
        scale = charged / spent if spent > 0 else 1.0
        self.charged_seconds += charged
        for unit, seconds in timed:
            members = unit.group.blocks if unit.group is not None else [unit.block]
            work = self.kind_work.setdefault(members[0].block_id.kind.value, [0.0, 0.0])
            work[0] += sum(b.flops_decode(position + 1) for b in members)
            work[1] += seconds * scale
        return {name: values[name] for name in returns}
