"""The layer executor shared by the in-process engine and the workers (no gRPC here).

Attention blocks of one layer held in one place run as one ``AttentionGroup``: one norm,
one q/k/v matmul over the blocks' ``qkv.weight`` rows laid out adjacently in one buffer
(each block's tensor is a view of its own rows, so a block still serializes, hashes and
migrates alone), and one batched attention over their caches (``blocks.attention.attend``).
``pack_attention_weights`` makes the layout when the weights arrived separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edgeheads.worker.blocks.attention import AttentionBlock, attend
from edgeheads.worker.blocks.base import Block
from edgeheads.worker.blocks.ffn import FeedForwardBlock
from edgeheads.worker.blocks.projection import ProjectionBlock

FUSED_NAMES = ("qkv.weight", "qkv.weight.scale", "qkv.weight.min", "qkv.bias")  # those present


class OpLike(Protocol):
    """One op of a worker call (worker/host.py OpSpec): value names in and out."""
    inputs: list[str]
    output: str


def adjacent_views(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the tensors are contiguous, equal-shaped row blocks that follow each other
    in one storage."""
    first = tensors[0]
    step = first.numel() * first.element_size()
    base = first.untyped_storage().data_ptr()
    return all(t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype
               and t.untyped_storage().data_ptr() == base
               and t.data_ptr() == first.data_ptr() + i * step for i, t in enumerate(tensors))


def extend_view(first: torch.Tensor, count: int) -> torch.Tensor:
    """A view of ``count`` adjacent copies of ``first``'s shape, starting at ``first``: (count*rows, ...)."""
    shape = (count * first.shape[0], *first.shape[1:])
    return torch.as_strided(first, shape, first.stride(), first.storage_offset())


def group_view(first: AttentionBlock, name: str, count: int) -> torch.Tensor:
    """``extend_view`` of the first block's weight ``name``, kept on that block while the weight
    is the same tensor. A kernel's prepared form of a weight (worker/kernels.py) lives as long as
    the tensor object it was made for, and a worker's groups are rebuilt whenever any block is
    loaded or unloaded there: a view made anew each time had every group on the worker repack its
    weights on its next call, once per block a migration brought (decoding slowed 2-3x)."""
    source = first.weights[name]
    held = first.group_views.get(name)
    if held is not None and held[0] is source and held[1] == count:
        return held[2]
    view = extend_view(source, count)
    first.group_views[name] = (source, count, view)  # one per name: an older view's prepared form goes
    return view


def owns_whole_buffer(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the tensors are adjacent views that together fill their storage exactly
    (nothing else, such as a block that left, is kept alive in it)."""
    storage = tensors[0].untyped_storage()
    return (adjacent_views(tensors) and tensors[0].storage_offset() == 0
            and storage.nbytes() == sum(t.nbytes for t in tensors))


def pack_rows(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copy equal-shaped tensors into one new buffer, one after another; returns views of it,
    each equal to its input: (rows, ...) each, adjacent."""
    buffer = torch.cat([t.reshape(t.shape[0], -1) for t in tensors])  # (n*rows, cols)
    return [v.view(t.shape) for v, t in zip(buffer.split(tensors[0].shape[0]), tensors)]


def fusible(blocks: Sequence[AttentionBlock]) -> bool:
    """Blocks that can run as one AttentionGroup as they are: one layer, equal norms, and
    q/k/v weights (and biases) adjacent in block order."""
    first = blocks[0]
    if any(b.block_id.layer != first.block_id.layer or b.norm_key != first.norm_key or b.shape != first.shape
           for b in blocks):
        return False
    return all(adjacent_views([b.weights[n] for b in blocks]) for n in FUSED_NAMES if n in first.weights)


def pack_attention_weights(blocks: Sequence[AttentionBlock]) -> bool:
    """Lay the blocks' q/k/v weights (and biases) out adjacently in one buffer, in block order,
    replacing each block's tensors by views of it (values unchanged, so content hashes hold).
    Returns True when it copied anything. Blocks of different layers or norms are refused."""
    first = blocks[0]
    if any(b.block_id.layer != first.block_id.layer or b.norm_key != first.norm_key for b in blocks):
        raise ValueError("only attention blocks of one layer with equal norms can share a buffer")
    copied = False
    for name in FUSED_NAMES:
        if name in first.weights and not owns_whole_buffer([b.weights[name] for b in blocks]):
            for block, view in zip(blocks, pack_rows([b.weights[name] for b in blocks])):
                block.weights[name] = view
            copied = True
    return copied


class AttentionGroup:
    """Attention blocks that run as one (``fusible`` must hold). The blocks stay the owners
    of their weights and caches; this holds views over them."""

    def __init__(self, blocks: Sequence[AttentionBlock]) -> None:
        self.blocks = list(blocks)
        if not fusible(self.blocks):
            raise ValueError(f"blocks {[str(b.block_id) for b in self.blocks]} cannot run as one group")
        first = self.blocks[0].weights
        # every block's rows as one weight of logical shape (G*(q+2)*d, D), in its format
        self.qkv = {n: group_view(self.blocks[0], n, len(self.blocks)) for n in FUSED_NAMES if n in first}
        self.width = self.blocks[0].shape.heads_per_group * self.blocks[0].shape.head_dim  # q*d per block

    def forward(self, session: str, x: torch.Tensor, reserve_tokens: int = 0) -> torch.Tensor:
        """x: (1, T, D) -> every block's head outputs, block after block: (1, T, G*q*d)."""
        self.blocks[0].check_input(x, self.blocks[0].shape.hidden_size)
        return attend(self.blocks, session, x, self.qkv, reserve_tokens=reserve_tokens)

    def split(self, heads: torch.Tensor) -> list[torch.Tensor]:
        """(1, T, G*q*d) -> one (1, T, q*d) view per block."""
        return list(heads.split(self.width, dim=-1))


def attention_groups(blocks: Sequence[AttentionBlock]) -> list[AttentionGroup]:
    """Split blocks (in the order given) into maximal runs that can each run as one group."""
    groups: list[list[AttentionBlock]] = []
    for block in blocks:
        if groups and fusible(groups[-1] + [block]):
            groups[-1].append(block)
        else:
            groups.append([block])
    return [AttentionGroup(g) for g in groups]


def layout_order(blocks: Sequence[AttentionBlock]) -> list[AttentionBlock]:
    """The blocks in the order their q/k/v rows lie in memory (buffer, then offset)."""
    def where(b: AttentionBlock) -> tuple[int, int]:
        w = b.weights["qkv.weight"]
        return w.untyped_storage().data_ptr(), w.data_ptr()
    return sorted(blocks, key=where)


@dataclass
class CallUnit:
    """One thing to run: an attention group (several attention ops of one layer on one input,
    fused) or a single projection/FFN op (``group`` None)."""
    inputs: list[str]
    outputs: list[str]
    block: Block | None = None
    group: AttentionGroup | None = None


def plan_units(ops: Sequence[OpLike], blocks: Sequence[Block]) -> list[CallUnit]:
    """A worker call's ops (in order, with the blocks they name) as units: the attention ops that read one input and belong to one layer
    run as fused groups (in weight-layout order) at the place of the first of them."""
    units: list[CallUnit] = []
    done: set[tuple[str, int]] = set()
    for op, block in zip(ops, blocks):
        if not isinstance(block, AttentionBlock):
            units.append(CallUnit(op.inputs, [op.output], block=block))
            continue
        key = (op.inputs[0], block.block_id.layer)
        if key in done:
            continue
        done.add(key)
        same = [(o, b) for o, b in zip(ops, blocks) if isinstance(b, AttentionBlock)
                and (o.inputs[0], b.block_id.layer) == key]
        output_of = {id(b): o.output for o, b in same}
        if len(output_of) < len(same):  # one block twice on one input: run the ops one by one
            units += [CallUnit(o.inputs, [o.output], group=AttentionGroup([b])) for o, b in same]
            continue
        for group in attention_groups(layout_order([b for _, b in same])):
            units.append(CallUnit([key[0]], [output_of[id(b)] for b in group.blocks], group=group))
    return units


@dataclass
class LayerExecutor:
    """One whole layer in one place: its attention groups, projection and FFN."""
    attention: list[AttentionBlock]  # one per KV group, in group order
    projection: ProjectionBlock
    ffn: FeedForwardBlock
    groups: list[AttentionGroup] = field(init=False)

    def __post_init__(self) -> None:
        by_norm: dict[tuple, list[AttentionBlock]] = {}
        for block in self.attention:
            by_norm.setdefault(block.norm_key, []).append(block)
        if len(by_norm) == 1:
            pack_attention_weights(self.attention)
        self.groups = attention_groups(self.attention)

    def forward(self, session: str, x: torch.Tensor, reserve_tokens: int = 0) -> torch.Tensor:
        """x_l: (1, T, D) -> x_{l+1}: (1, T, D)."""
        parts = [g.forward(session, x, reserve_tokens) for g in self.groups]
        heads = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (1, T, H*d)
        return self.ffn.forward(self.projection.forward(heads, x))

    def drop_session(self, session: str) -> None:
        for block in self.attention:
            block.drop_session(session)
