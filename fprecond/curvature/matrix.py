"""The curvature of a whole model: a tuple of blocks covering every parameter once."""

from __future__ import annotations

import math

import torch

from fprecond.curvature.blocks import CurvatureBlock, block_summary, flatten_vector
from fprecond.tree import pytree_dataclass, static_field, tree_map

__all__ = ["Curvature"]

Vector = dict[str, torch.Tensor]


@pytree_dataclass
class Curvature:
    """A block-structured curvature matrix over all parameters (an immutable pytree).

    Attributes:
        blocks: the blocks; together they cover each parameter exactly once, and
            the matrix is zero between blocks.
        kind: the curvature kind it estimates (``"ggn"``, ``"fisher"``, ...).
        structure: ``"full"``, ``"layer"``, ``"kron"``, ``"unit"`` or ``"diag"``.
        names, shapes: all parameters in ``named_parameters`` order (the layout of
            :meth:`to_dense` and of vectors).

    Scaling follows the loss as reduced (see :mod:`fprecond.func`). Arithmetic
    for moving averages: ``fprecond.tree.tree_add``/``tree_scale`` act leaf-wise
    (per factor for Kronecker blocks); :meth:`scaled` scales the matrix exactly.
    """

    blocks: tuple[CurvatureBlock, ...]
    kind: str = static_field()
    structure: str = static_field()
    names: tuple[str, ...] = static_field()
    shapes: tuple[tuple[int, ...], ...] = static_field()

    def __repr__(self) -> str:
        inner = ", ".join(block_summary(block) for block in self.blocks)
        return f"Curvature(kind={self.kind!r}, structure={self.structure!r}, blocks=[{inner}])"

    @property
    def size(self) -> int:
        """Number of parameters ``P``."""
        return sum(math.prod(shape) for shape in self.shapes)

    def _replace_blocks(self, blocks: tuple[CurvatureBlock, ...]) -> "Curvature":
        return Curvature(tuple(blocks), self.kind, self.structure, self.names, self.shapes)

    def mvp(self, vector: Vector) -> Vector:
        """Curvature times ``vector`` (a ``{name: tensor}`` dict shaped like the params)."""
        self.check_vector(vector)
        out: Vector = {}
        for block in self.blocks:
            out.update(block.mvp(vector))
        return {name: out[name] for name in self.names}

    def check_vector(self, vector: Vector) -> None:
        """Raise ``ValueError`` unless ``vector`` has the parameters' keys and shapes."""
        if not isinstance(vector, dict) or set(vector) != set(self.names):
            keys = sorted(vector) if isinstance(vector, dict) else type(vector).__name__
            raise ValueError(f"curvature product: the vector must be a dict with keys {list(self.names)}, got {keys}")
        for name, shape in zip(self.names, self.shapes):
            if tuple(vector[name].shape) != shape:
                raise ValueError(f"curvature product: vector[{name!r}] has shape {tuple(vector[name].shape)}, "
                                 f"the parameter has shape {shape}")

    def to_dense(self) -> torch.Tensor:
        """The ``(P, P)`` matrix in ``named_parameters`` order, each tensor row-major."""
        offsets, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            offsets[name] = start
            start += math.prod(shape)
        first = self.blocks[0].dense()
        dense = torch.zeros(start, start, dtype=first.dtype, device=first.device)
        for index, block in enumerate(self.blocks):
            matrix = first if index == 0 else block.dense()
            positions = torch.cat([
                torch.arange(offsets[name], offsets[name] + math.prod(shape), device=matrix.device)
                for name, shape in zip(block.names, block.shapes)
            ])
            dense = dense.index_put((positions[:, None], positions[None, :]), matrix)
        return dense

    def trace(self) -> torch.Tensor:
        """The trace (0-dim)."""
        return torch.stack([block.trace() for block in self.blocks]).sum()

    def damped(self, damping: float | torch.Tensor, pi: bool = False) -> "Curvature":
        """Tikhonov damping ``+ damping · I``; with ``pi``, Kronecker blocks use π-adjusted
        factor damping instead (an approximation of it, Martens & Grosse 2015)."""
        return self._replace_blocks(tuple(block.damped(damping, pi) for block in self.blocks))

    def scaled(self, factor: float | torch.Tensor) -> "Curvature":
        """The matrix times a scalar."""
        return self._replace_blocks(tuple(block.scaled(factor) for block in self.blocks))

    def power(self, exponent: float) -> "Curvature":
        """Blockwise matrix power (eigenvalues clamped at zero; damp before negative powers).

        Kronecker blocks come back as :class:`~fprecond.curvature.blocks.KroneckerEigenBlock`.
        """
        return self._replace_blocks(tuple(block.power(exponent) for block in self.blocks))

    def inverse(self) -> "Curvature":
        """``power(-1.0)``."""
        return self.power(-1.0)

    def moving_average(self, new: "Curvature", decay: float | torch.Tensor) -> "Curvature":
        """``decay · self + (1 - decay) · new`` leaf-wise (per factor for Kronecker blocks)."""
        return tree_map(lambda old, fresh: decay * old + (1 - decay) * fresh, self, new)

    def quadratic_form(self, vector: Vector) -> torch.Tensor:
        """``vᵀ C v`` (0-dim)."""
        product = self.mvp(vector)
        return torch.dot(flatten_vector(vector, self.names), flatten_vector(product, self.names))
