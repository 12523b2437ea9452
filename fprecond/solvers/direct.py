"""Direct solvers: damped inverse by Cholesky, eigendecomposition, inverse ``p``-th
roots (by ``eigh`` or the coupled Newton iteration) and the Newton-Schulz inverse."""

from __future__ import annotations

import dataclasses

import torch

from fprecond._validation import check_choice
from fprecond.curvature.blocks import CurvatureBlock
from fprecond.curvature.lowrank import _LowRankBase
from fprecond.lazy import lazy_where
from fprecond.spectral import singular_floor
from fprecond.solvers import linalg
from fprecond.solvers.base import PowerSolver

__all__ = ["CholeskySolver", "EighSolver", "InverseRootSolver", "NewtonSchulzSolver"]


def _no_failures(matrix: torch.Tensor) -> torch.Tensor:
    return torch.zeros(matrix.shape[:-2], dtype=torch.int64, device=matrix.device)


@dataclasses.dataclass(frozen=True)
class CholeskySolver(PowerSolver):
    """``(C + λ I)⁻¹`` by Cholesky factorisation (``torch.linalg.cholesky_ex``).

    A failed factorisation retries with the damping multiplied by ``growth`` up to
    ``retries`` times, then falls back to an eigendecomposition with clamped
    eigenvalues; the retries are computed only when some matrix failed. Low-rank
    blocks are solved in their ``R x R`` Gram space with the Sherman-Morrison-
    Woodbury identity ``(s I + Vᵀ K V)⁻¹ = (1/s) [I - Vᵀ R (s I + Rᵀ V Vᵀ R)⁻¹ Rᵀ V]`` with
    ``R Rᵀ = K``.
    """

    retries: int = 3
    growth: float = 10.0

    def matrix_power(self, matrix: torch.Tensor, damping: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eigenvalues == "abs":  # |M| has no Cholesky route
            return linalg.eigh_power(matrix, -1.0, damping, eigenvalues="abs"), _no_failures(matrix)
        return linalg.damped_cholesky_inverse(matrix, damping, retries=self.retries, growth=self.growth)

    def _low_rank(self, block: _LowRankBase, damping: torch.Tensor | float) -> tuple[CurvatureBlock, torch.Tensor]:
        if block.rank >= block.size or self.eigenvalues == "abs":
            return super()._low_rank(block, damping)
        # Any R with R Rᵀ = K will do: Cholesky (cheap; K = I for estimates), or the
        # symmetric square root where K is only semi-definite.
        factor, info = torch.linalg.cholesky_ex(block.core)
        root = lazy_where((info != 0)[..., None, None], lambda: linalg.eigh_power(block.core, 0.5), factor)
        inner = root.transpose(-1, -2) @ block.gram() @ root
        # A zero scale (no damping) has no inverse: floor it, as eigenvalues are floored elsewhere.
        top = torch.diagonal(inner, dim1=-2, dim2=-1).abs().amax(dim=-1)
        scale = torch.maximum(block.scale + damping, singular_floor(top, block.rank))
        inverse, failed = linalg.damped_cholesky_inverse(inner, scale, retries=self.retries, growth=self.growth)
        core = -(root @ inverse @ root.transpose(-1, -2)) / scale
        return block._replace(core, 1.0 / scale), failed


@dataclasses.dataclass(frozen=True)
class EighSolver(PowerSolver):
    """``(f(C) + λ I)^exponent`` by eigendecomposition (``torch.linalg.eigh``), with
    ``f`` clamping negative eigenvalues at zero or taking absolute values."""

    power: float = -1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "exponent", float(self.power))

    def matrix_power(self, matrix: torch.Tensor, damping: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        return linalg.eigh_power(matrix, self.exponent, damping, eigenvalues=self.eigenvalues), _no_failures(matrix)


@dataclasses.dataclass(frozen=True)
class InverseRootSolver(PowerSolver):
    """``(C + λ I)^{-1/root}`` by ``"eigh"`` or by the coupled Newton iteration
    (``"newton"``, a fixed number of ``iterations``; Guo & Higham 2006, as in
    Shampoo's implementation by Anil et al. 2020)."""

    root: int = 2
    method: str = "eigh"
    iterations: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = "inverse_root"
        check_choice(owner, "method", self.method, ("eigh", "newton"))
        if isinstance(self.root, bool) or not isinstance(self.root, int) or self.root < 1:
            raise ValueError(f"{owner}: root must be a positive int, got {self.root!r}")
        if self.method == "newton" and self.eigenvalues == "abs":
            raise ValueError(f"{owner}: eigenvalues='abs' needs method='eigh'")
        object.__setattr__(self, "exponent", -1.0 / self.root)

    def matrix_power(self, matrix: torch.Tensor, damping: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "eigh":
            return linalg.eigh_power(matrix, self.exponent, damping, eigenvalues=self.eigenvalues), _no_failures(matrix)
        root = linalg.inverse_root_newton(matrix, self.root, damping, iterations=self.iterations)
        return root, _no_failures(matrix)


@dataclasses.dataclass(frozen=True)
class NewtonSchulzSolver(PowerSolver):
    """``(C + λ I)⁻¹`` by the Newton-Schulz iteration ``X ← X (2I - A X)`` with a fixed
    number of ``iterations`` (matrix products only: suited to accelerators)."""

    iterations: int = 60

    def matrix_power(self, matrix: torch.Tensor, damping: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        return linalg.newton_schulz_inverse(matrix, damping, iterations=self.iterations), _no_failures(matrix)
