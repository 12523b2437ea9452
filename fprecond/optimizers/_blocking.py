"""Cut a parameter tensor into the blocks a Kronecker-factored preconditioner acts on.

Shampoo (Gupta et al., 2018) keeps one factor per mode of a tensor. For large or
oddly shaped tensors, distributed Shampoo (Anil et al., 2020; Shi et al., 2023)
first merges small adjacent dimensions, then splits every dimension larger than
``max_dim`` into blocks of at most ``max_dim`` and preconditions each block on its
own. :func:`plan_blocks` turns a shape into such a plan:

1. **Merge** (``merge_dims=True``, Meta's ``merge_small_dims``): walking the
   dimensions left to right, the next one joins the current merged one while the
   product stays ``<= max_dim`` (or either is 1). A conv kernel ``(O, C, kh, kw)``
   follows the same rule: ``(3, 2, 3, 3)`` with ``max_dim = 1024`` merges into
   ``(54,)``; ``(64, 32, 3, 3)`` into ``(64, 288)``.
2. **Split** (``split_large=True``): a merged dimension of size ``d > max_dim``
   becomes ``d // max_dim`` blocks of ``max_dim`` and, when ``d % max_dim`` is not
   zero, one ragged block of the rest. With ``split_large=False`` (SOAP) the
   dimension stays whole and is left unpreconditioned (identity).
3. **Group**: blocks of equal shape form one :class:`BlockGroup` and are stacked
   into a batch ``(B, *block_shape)``, so that every later step is a few batched
   matmuls instead of a loop over blocks. A ``k``-dimensional tensor has at most
   ``2^k`` groups (full or ragged along each dimension); no padding is used, so
   ragged blocks are exact.

Within a block, the *modes* are the dimensions of size ``> 1`` (and, without
splitting, ``<= max_dim``): only they get a factor. A block's *order* is its
number of modes, so a ``(3, 1)`` block is treated as a vector (order 1). A
scalar (or an all-ones shape) has no mode and cannot be preconditioned; a ragged
one-element block of a larger tensor gets a ``1 × 1`` factor on its first
dimension, so that it is normalised like the other blocks.

The plan is static (built from shapes alone), so it is computed in ``init`` and
again, cached, in ``update``; under ``torch.func.vmap`` the shapes seen are the
per-member ones.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable, Sequence

import torch

__all__ = ["BlockGroup", "BlockPlan", "merge_small_dims", "plan_blocks", "mode_product", "mode_statistics"]


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Merge adjacent dimensions while their product stays ``<= max_dim`` (or one of them is 1).

    Meta's ``distributed_shampoo`` rule (``merge_small_dims``); the SOAP reference's
    ``merge_dims`` gives the same shapes. A 0-dim shape stays ``()``.
    """
    if len(shape) == 0:
        return ()
    merged = [int(shape[0])]
    for size in shape[1:]:
        product = merged[-1] * int(size)
        if merged[-1] == 1 or size == 1 or product <= max_dim:
            merged[-1] = product
        else:
            merged.append(int(size))
    return tuple(merged)


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Blocks of one shape: ``counts[d]`` blocks of ``block_shape[d]`` along merged dimension
    ``d``, starting at offset ``starts[d]``; ``modes`` are the preconditioned dimensions."""

    starts: tuple[int, ...]
    counts: tuple[int, ...]
    block_shape: tuple[int, ...]
    modes: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return math.prod(self.counts)

    @property
    def order(self) -> int:
        return len(self.modes)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """How one tensor of ``shape`` is merged (``merged``) and cut into :class:`BlockGroup` s.

    ``split(x)`` returns one ``(B, *block_shape)`` tensor per group; ``merge`` inverts it.
    """

    shape: tuple[int, ...]
    merged: tuple[int, ...]
    groups: tuple[BlockGroup, ...]
    parts_per_dim: tuple[int, ...]  # 1 or 2 (full blocks, ragged block) per merged dimension

    @property
    def preconditioned(self) -> bool:
        """Whether any block has a mode (a factor to keep)."""
        return any(group.modes for group in self.groups)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The blocks of ``x`` (shaped like ``shape``), one ``(B, *block_shape)`` tensor per group."""
        merged = x.reshape(self.merged)
        if not self.merged:  # a scalar: one block of shape ()
            return [merged.reshape(1)]
        blocks = []
        for group in self.groups:
            region = merged
            for dim, (start, count, size) in enumerate(zip(group.starts, group.counts, group.block_shape)):
                if count * size != self.merged[dim]:
                    region = region.narrow(dim, start, count * size)
            interleaved = [n for pair in zip(group.counts, group.block_shape) for n in pair]
            k = len(self.merged)
            region = region.reshape(interleaved).permute(*range(0, 2 * k, 2), *range(1, 2 * k, 2))
            blocks.append(region.reshape(group.num_blocks, *group.block_shape))
        return blocks

    def merge(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`: a tensor shaped like ``shape``."""
        k = len(self.merged)
        if k == 0:
            return blocks[0].reshape(self.shape)
        pieces = []
        for group, block in zip(self.groups, blocks):
            grid = block.reshape(*group.counts, *group.block_shape)
            order = [index for pair in zip(range(k), range(k, 2 * k)) for index in pair]
            pieces.append(grid.permute(*order).reshape([c * s for c, s in zip(group.counts, group.block_shape)]))
        # Groups are in itertools.product order over the parts of each dimension:
        # concatenate the last dimension first, then outwards.
        for dim in reversed(range(k)):
            parts = self.parts_per_dim[dim]
            if parts > 1:
                pieces = [torch.cat(pieces[i:i + parts], dim=dim) for i in range(0, len(pieces), parts)]
        assert len(pieces) == 1
        return pieces[0].reshape(self.shape)


@functools.lru_cache(maxsize=1024)
def _plan(shape: tuple[int, ...], max_dim: int, merge_dims: bool, split_large: bool) -> BlockPlan:
    merged = merge_small_dims(shape, max_dim) if merge_dims else tuple(shape)
    # Per dimension: (start, count, size) of the full blocks and of the ragged one.
    parts: list[list[tuple[int, int, int]]] = []
    for size in merged:
        if split_large and size > max_dim:
            full, rest = divmod(size, max_dim)
            parts.append([(0, full, max_dim)] + ([(full * max_dim, 1, rest)] if rest else []))
        else:
            parts.append([(0, 1, size)])
    groups = []
    for combination in itertools.product(*parts):
        block_shape = tuple(size for _, _, size in combination)
        modes = tuple(d for d, size in enumerate(block_shape) if 1 < size <= max_dim)
        groups.append(BlockGroup(starts=tuple(start for start, _, _ in combination),
                                 counts=tuple(count for _, count, _ in combination),
                                 block_shape=block_shape, modes=modes))
    if any(group.modes for group in groups):
        # A ragged one-element block of a preconditioned tensor (7 = 3 + 3 + 1) gets a
        # 1 x 1 factor, so that it is scaled like its neighbours (AdaGrad on one entry),
        # as in Meta's implementation, instead of being left raw.
        groups = [group if group.modes or not group.block_shape else dataclasses.replace(group, modes=(0,))
                  for group in groups]
    return BlockPlan(shape=tuple(shape), merged=merged, groups=tuple(groups),
                     parts_per_dim=tuple(len(p) for p in parts))


def plan_blocks(shape: Sequence[int], max_dim: int, *, merge_dims: bool = True, split_large: bool = True) -> BlockPlan:
    """The :class:`BlockPlan` of a tensor of ``shape`` (see the module docstring).

    Args:
        shape: the parameter's shape.
        max_dim: the largest factor size (Meta's ``max_preconditioner_dim``).
        merge_dims: merge small adjacent dimensions first.
        split_large: split dimensions larger than ``max_dim`` into blocks; if False
            they stay whole and get no factor.
    """
    if isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1:
        raise ValueError(f"plan_blocks: max_dim must be an int >= 1, got {max_dim!r}")
    return _plan(tuple(int(s) for s in shape), max_dim, bool(merge_dims), bool(split_large))


# --------------------------------------------------------------------------- products along one mode


def _split_at(x: torch.Tensor, mode: int) -> tuple[int, int, int, int]:
    """``(B, pre, d, post)`` for a ``(B, *block_shape)`` tensor and a mode of the block."""
    dims = x.shape[1:]
    return x.shape[0], math.prod(dims[:mode]), dims[mode], math.prod(dims[mode + 1:])


def mode_product(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``x ×_mode matrix``: ``y[b, ..., a, ...] = Σ_j matrix[b, a, j] x[b, ..., j, ...]``.

    Args:
        x: ``(B, n_1, ..., n_k)`` blocks.
        matrix: ``(B, d, d)`` with ``d = n_{mode+1}``.
        mode: the block dimension acted on (0-based, not counting ``B``).
    """
    batch, pre, d, post = _split_at(x, mode)
    if pre == 1:  # leading mode: one batched matmul
        return (matrix @ x.reshape(batch, d, post)).reshape(x.shape)
    if post == 1:  # trailing mode
        return (x.reshape(batch, pre, d) @ matrix.mT).reshape(x.shape)
    return torch.einsum("bpjq,baj->bpaq", x.reshape(batch, pre, d, post), matrix).reshape(x.shape)


def mode_statistics(x: torch.Tensor, mode: int) -> torch.Tensor:
    """``G_(mode) G_(mode)ᵀ`` per block: ``(B, d, d)``, contracting every other block dimension."""
    batch, pre, d, post = _split_at(x, mode)
    if pre == 1:
        flat = x.reshape(batch, d, post)
        return flat @ flat.mT
    if post == 1:
        flat = x.reshape(batch, pre, d)
        return flat.mT @ flat
    grouped = x.reshape(batch, pre, d, post)
    return torch.einsum("bpiq,bpjq->bij", grouped, grouped)



def finite_matrices(matrices: torch.Tensor) -> torch.Tensor:
    """Per matrix of a ``(B, d, d)`` batch, whether every entry is finite: ``(B, 1, 1)``."""
    return torch.isfinite(matrices).all(-1, keepdim=True).all(-2, keepdim=True)


Statistics = tuple[tuple[torch.Tensor, ...], ...]  # per group of same-shaped blocks, per mode: (B, d, d)


def accumulate_statistics(plans: Sequence[BlockPlan], gradients: Sequence[torch.Tensor],
                          old: Sequence[Statistics], combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                          ) -> tuple[list[Statistics], list[Statistics], torch.Tensor]:
    """Shampoo-style per-mode statistics of every block, folded into the old ones.

    For each tensor (its ``plan``, ``gradient`` and ``old`` statistics), group of
    blocks and mode: ``new = combine(old, mode_statistics(block, mode))``. A new
    matrix that is not finite (a NaN gradient, or a finite one whose outer product
    overflows in float32) is not stored, or the factor would stay infinite for good:
    the old matrix is kept. Returns the statistics, the per-matrix acceptance flags
    ``(B, 1, 1)`` in the same layout, and the number of rejected matrices (0-dim int64).
    """
    fresh, accepted = [], []
    rejected = torch.zeros((), dtype=torch.int64, device=gradients[0].device if gradients else None)
    for plan, gradient, stats in zip(plans, gradients, old):
        per_group, flags = [], []
        for group, block, group_stats in zip(plan.groups, plan.split(gradient), stats):
            kept, oks = [], []
            for previous, mode in zip(group_stats, group.modes):
                new = combine(previous, mode_statistics(block, mode))
                ok = finite_matrices(new)
                kept.append(torch.where(ok, new, previous))
                oks.append(ok)
                rejected = rejected + (~ok).sum()
            per_group.append(tuple(kept))
            flags.append(tuple(oks))
        fresh.append(tuple(per_group))
        accepted.append(tuple(flags))
    return fresh, accepted, rejected
