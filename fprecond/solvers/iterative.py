"""Matrix-free solving: conjugate gradient on the damped curvature's products."""

from __future__ import annotations

import dataclasses

import torch

from fprecond.curvature.matrix import Curvature
from fprecond.solvers.cg import conjugate_gradient
from fprecond.solvers.base import Refreshed, Solver

__all__ = ["ConjugateGradientSolver"]

Vector = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ConjugateGradientSolver(Solver):
    """``(C + λ I)⁻¹ g`` by conjugate gradient with a fixed budget of ``iterations``.

    ``refresh`` only damps the curvature (nothing is factorised); ``apply`` runs CG
    on its products, stopping (by masking) at relative residual ``tol`` or at
    negative curvature. Suited to structures whose product is cheap but whose
    inverse is not (``full`` or ``layer`` blocks of a large model).
    """

    iterations: int = 50
    tol: float = 1e-10

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"conjugate_gradient: iterations must be a positive int, got {self.iterations!r}")

    def refresh(self, curvature: Curvature, damping: torch.Tensor | float) -> Refreshed:
        return Refreshed(curvature.damped(damping), torch.zeros((), dtype=torch.int64))

    def apply(self, preconditioner: Curvature, vector: Vector) -> Vector:
        solution, _ = conjugate_gradient(preconditioner.mvp, vector, iterations=self.iterations, tol=self.tol)
        return solution
