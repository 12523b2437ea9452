"""The solver interface: an expensive ``refresh`` and a cheap ``apply``.

``refresh(curvature, damping)`` turns a :class:`~fprecond.curvature.Curvature`
into a *preconditioner*: another ``Curvature`` of the same block structure that
holds a function of the damped matrix, ``(C + λ I)^e`` (``e = -1`` for an
inverse, ``-1/p`` for an inverse ``p``-th root), or for matrix-free solvers the
damped matrix itself. ``apply(preconditioner, vector)`` is then a product per
block: matrix times vector for dense and unit-wise blocks, ``G⁻¹ M A⁻¹`` for
Kronecker blocks, rotations for eigenbasis blocks, ``R``-vector products for
low-rank blocks. A transform caches the preconditioner in its state and calls
``refresh`` only on the steps its schedule names.

Each block type is handled by one of three paths, chosen statically from the
block's type and shapes so that the cached structure never changes:

- *matrix*: dense and unit-wise blocks (batched), and the two factors of a
  Kronecker block when damping is split between them (``kron="factored"``, the
  K-FAC practice; π-damping of Martens & Grosse 2015 by default);
- *spectral*: diagonal blocks, eigenbasis blocks, and Kronecker blocks with exact
  Tikhonov damping (``kron="exact"``: the eigenvalues ``λ_G λ_A + λ`` in the
  Kronecker eigenbasis);
- *low rank*: ``scale I + Vᵀ K V`` blocks, solved in the ``R x R`` Gram space
  (Sherman-Morrison-Woodbury) when ``R`` is below the block size, densely
  otherwise.

Eigenvalues are clamped at zero before damping (``eigenvalues="clamp"``) or
taken in absolute value (``"abs"``, saddle-free Newton). Every path returns
finite values for finite input, whatever the conditioning: failed Cholesky
factorisations escalate the damping or fall back to an eigendecomposition, and
``refresh`` reports how many attempts failed.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import NamedTuple

import torch

from fprecond._validation import check_choice
from fprecond.curvature.blocks import (
    CurvatureBlock,
    DenseBlock,
    DiagonalBlock,
    KroneckerBlock,
    KroneckerEigenBlock,
    UnitBlock,
)
from fprecond.curvature.lowrank import _LowRankBase, low_rank_power
from fprecond.curvature.matrix import Curvature
from fprecond.spectral import damped_power

__all__ = ["Solver", "Refreshed", "PowerSolver"]

Vector = dict[str, torch.Tensor]


class Refreshed(NamedTuple):
    """What :meth:`Solver.refresh` returns: the ``preconditioner`` and ``failures``, a
    0-dim int64 count of failed factorisation attempts (0 when all went well)."""

    preconditioner: Curvature
    failures: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Solver(abc.ABC):
    """Base class of all solvers (see the module docstring)."""

    @abc.abstractmethod
    def refresh(self, curvature: Curvature, damping: torch.Tensor | float) -> Refreshed:
        """The expensive part: the preconditioner of ``curvature + damping · I``."""

    def apply(self, preconditioner: Curvature, vector: Vector) -> Vector:
        """The cheap part: the preconditioner times ``vector`` (a params-shaped dict)."""
        return preconditioner.mvp(vector)


@dataclasses.dataclass(frozen=True)
class PowerSolver(Solver):
    """A solver computing ``(C + λ I)^exponent`` block by block.

    Subclasses supply :meth:`matrix_power` for batched dense matrices; the
    spectral and low-rank paths are shared.

    Attributes:
        kron: ``"factored"``: Kronecker blocks get the damping split between
            their factors and keep Kronecker form, ``(A + π√λ I)^e ⊗ (G + √λ/π I)^e``;
            ``"exact"``: exact Tikhonov damping in the Kronecker eigenbasis.
        pi: use π-damping in the factored split (otherwise ``√λ`` for each factor).
        eigenvalues: ``"clamp"`` or ``"abs"`` (see the module docstring).
    """

    kron: str = "factored"
    pi: bool = True
    eigenvalues: str = "clamp"

    #: The power computed (set by subclasses).
    exponent: float = dataclasses.field(default=-1.0, init=False)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "kron", self.kron, ("factored", "exact"))
        check_choice(owner, "eigenvalues", self.eigenvalues, ("clamp", "abs"))

    @abc.abstractmethod
    def matrix_power(self, matrix: torch.Tensor, damping: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(M) + damping I)^exponent`` for symmetric ``(..., n, n)`` and the per-matrix
        count of failed attempts ``(...)``."""

    def refresh(self, curvature: Curvature, damping: torch.Tensor | float) -> Refreshed:
        blocks, failures = [], []
        for block in curvature.blocks:
            refreshed, failed = self.refresh_block(block, damping)
            blocks.append(refreshed)
            failures.append(failed.sum())
        total = torch.stack(failures).sum().to(torch.int64)
        return Refreshed(Curvature(tuple(blocks), curvature.kind, curvature.structure, curvature.names,
                                   curvature.shapes), total)

    def _spectral(self, values: torch.Tensor, damping: torch.Tensor | float) -> torch.Tensor:
        # One floor per block (a diagonal block's entries are all its eigenvalues).
        return damped_power(values, damping, self.exponent, self.eigenvalues, scale=values.abs().amax())

    def refresh_block(self, block: CurvatureBlock, damping: torch.Tensor | float
                      ) -> tuple[CurvatureBlock, torch.Tensor]:
        """One block's preconditioner and its failure counts."""
        zero = torch.zeros((), dtype=torch.int64)
        if isinstance(block, DenseBlock):
            matrix, failed = self.matrix_power(block.matrix, damping)
            return DenseBlock(matrix, block.names, block.param_shapes), failed
        if isinstance(block, UnitBlock):
            matrices, failed = self.matrix_power(block.blocks, damping)
            return UnitBlock(matrices, block.layout), failed
        if isinstance(block, DiagonalBlock):
            values = {name: self._spectral(d, damping) for name, d in block.diagonal.items()}
            return DiagonalBlock(values, block.names), zero
        if isinstance(block, KroneckerEigenBlock):
            return KroneckerEigenBlock(block.input_basis, block.output_basis, self._spectral(block.scaling, damping),
                                       block.layout), zero
        if isinstance(block, KroneckerBlock):
            return self._kronecker(block, damping)
        if isinstance(block, _LowRankBase):
            return self._low_rank(block, damping)
        raise TypeError(f"{type(self).__name__}: no solver path for a {type(block).__name__}")

    def _kronecker(self, block: KroneckerBlock, damping: torch.Tensor | float) -> tuple[CurvatureBlock, torch.Tensor]:
        if self.kron == "exact":
            eigen = block.eigendecomposition()
            return KroneckerEigenBlock(eigen.input_basis, eigen.output_basis, self._spectral(eigen.scaling, damping),
                                       block.layout), torch.zeros((), dtype=torch.int64)
        split = block.factor_damped(block.damping + damping, pi=self.pi)
        a_power, a_failed = self.matrix_power(split.input_factor, 0.0)
        g_power, g_failed = self.matrix_power(split.output_factor, 0.0)
        return KroneckerBlock(a_power, g_power, block.damping.new_zeros(()), block.layout), a_failed.sum() + g_failed.sum()

    def _low_rank(self, block: _LowRankBase, damping: torch.Tensor | float) -> tuple[CurvatureBlock, torch.Tensor]:
        if block.rank >= block.size:  # the Gram space is no smaller: solve densely
            matrix, failed = self.matrix_power(block.damped(damping).dense(), 0.0)
            return DenseBlock(matrix, block.names, block.shapes), failed
        core, scale = low_rank_power(block.gram(), block.core, block.scale + damping, self.exponent, self.eigenvalues)
        return block._replace(core, scale), torch.zeros((), dtype=torch.int64)
