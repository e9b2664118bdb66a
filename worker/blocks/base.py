"""What every block has: an id, the model shape, named weights, and its resource report."""

from __future__ import annotations

import torch

from edgeheads.common import formats, spec
from edgeheads.common.spec import BlockId, ModelShape


class BlockShapeError(ValueError):
    """A block's weights or inputs do not have the shapes/dtypes its model shape implies."""


class Block:
    """Base class. ``weights`` maps a block-local name to a tensor; ``expected_shapes``
    lists the names and shapes this block requires (checked at construction)."""

    def __init__(self, block_id: BlockId, shape: ModelShape, weights: dict[str, torch.Tensor]) -> None:
        self.block_id = block_id
        self.shape = shape
        self.weights = weights
        self._check_weights()

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _check_weights(self) -> None:
        """Names, logical shapes (quantized weights folded back to (out, in)) and one compute
        dtype for every float tensor (edgeheads.common.formats)."""
        expected = self.expected_shapes()
        try:
            formats.validate(self.weights)
            shapes = formats.logical_shapes(self.weights)
            floats = formats.compute_dtype_of(self.weights)
        except formats.FormatError as err:
            raise BlockShapeError(f"{self.block_id}: {err}") from None
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        if missing or extra:
            raise BlockShapeError(f"{self.block_id}: missing weights {missing}, unexpected weights {extra}")
        self._dtype = formats.FLOAT_FORMATS[self.shape.dtype]
        if floats not in (None, self._dtype):
            raise BlockShapeError(f"{self.block_id}: weights are {floats}, the model computes in {self._dtype}")
        for name, want in expected.items():
            got = shapes[name]
            if got != want:
                raise BlockShapeError(f"{self.block_id}: weight {name} has shape {got}, expected {want}")

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: of the activations, the caches and every float weight."""
        return self._dtype

    def check_input(self, x: torch.Tensor, width: int, name: str = "x") -> None:
        """x must be (1, T, width) with T >= 1 and the block's dtype."""
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[1] < 1 or x.shape[2] != width:
            raise BlockShapeError(f"{self.block_id}: {name} has shape {tuple(x.shape)}, expected (1, T, {width})")
        if x.dtype != self.dtype:
            raise BlockShapeError(f"{self.block_id}: {name} has dtype {x.dtype}, expected {self.dtype}")

    # ------------------------------------------------------------------ resource report
    @property
    def weight_bytes(self) -> int:
        """Bytes of the parameters actually held (sum of tensor sizes). RoPE constants
        (``rope.*``, d/2 + 1 numbers derived from the config) are not parameters."""
        return sum(t.numel() * t.element_size() for name, t in self.weights.items() if not name.startswith("rope."))

    @property
    def kv_bytes_per_token(self) -> int:
        """K/V growth per token for one session (see spec.kv_bytes_per_token)."""
        return spec.kv_bytes_per_token(self.shape, self.block_id.kind)

    def flops_decode(self, context_tokens: int) -> float:
        """FLOPs for one decoded token with ``context_tokens`` in the cache (spec.block_flops_decode)."""
        return spec.block_flops_decode(self.shape, self.block_id.kind, context_tokens)

    def flops_prefill(self, prompt_tokens: int) -> float:
        """Mean FLOPs per token of a ``prompt_tokens`` prefill (spec.block_flops_prefill)."""
        return spec.block_flops_prefill(self.shape, self.block_id.kind, prompt_tokens)
