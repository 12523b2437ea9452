"""Solvers: curvature factors -> cached preconditioner (``refresh``) -> product with a
gradient (``apply``). See :mod:`fprecond.solvers.base` for the contract and
:mod:`fprecond.solvers.linalg` for the matrix-level routines."""

from __future__ import annotations

from typing import Callable

from fprecond._validation import check_choice
from fprecond.solvers import cg, linalg
from fprecond.solvers.base import PowerSolver, Refreshed, Solver
from fprecond.solvers.direct import CholeskySolver, EighSolver, InverseRootSolver, NewtonSchulzSolver
from fprecond.solvers.iterative import ConjugateGradientSolver

__all__ = [
    "Solver",
    "PowerSolver",
    "Refreshed",
    "CholeskySolver",
    "EighSolver",
    "InverseRootSolver",
    "NewtonSchulzSolver",
    "ConjugateGradientSolver",
    "SOLVERS",
    "cholesky",
    "eigh",
    "inverse_root",
    "newton_schulz",
    "conjugate_gradient",
    "solver_from",
    "linalg",
]


def cholesky(*, kron: str = "factored", pi: bool = True, retries: int = 3, growth: float = 10.0) -> CholeskySolver:
    """Damped inverse by Cholesky with damping escalation and an ``eigh`` fallback
    (Woodbury in the Gram space for low-rank blocks)."""
    return CholeskySolver(kron=kron, pi=pi, retries=retries, growth=growth)


def eigh(*, power: float = -1.0, eigenvalues: str = "clamp", kron: str = "exact", pi: bool = True) -> EighSolver:
    """``(f(C) + λ I)^power`` by eigendecomposition; ``eigenvalues="abs"`` for saddle-free Newton."""
    return EighSolver(kron=kron, pi=pi, eigenvalues=eigenvalues, power=power)


def inverse_root(root: int = 2, *, method: str = "eigh", iterations: int = 50, kron: str = "factored",
                 pi: bool = True) -> InverseRootSolver:
    """``(C + λ I)^{-1/root}`` by ``eigh`` or the coupled Newton iteration."""
    return InverseRootSolver(kron=kron, pi=pi, root=root, method=method, iterations=iterations)


def newton_schulz(*, iterations: int = 60, kron: str = "factored", pi: bool = True) -> NewtonSchulzSolver:
    """Damped inverse by the Newton-Schulz iteration."""
    return NewtonSchulzSolver(kron=kron, pi=pi, iterations=iterations)


def conjugate_gradient(*, iterations: int = 50, tol: float = 1e-10) -> ConjugateGradientSolver:
    """Matrix-free CG on the damped curvature's products."""
    return ConjugateGradientSolver(iterations=iterations, tol=tol)


SOLVERS: dict[str, Callable[[], Solver]] = {"cholesky": cholesky, "eigh": eigh, "inverse_root": inverse_root, "newton_schulz": newton_schulz,
           "cg": conjugate_gradient}


def solver_from(solver: Solver | str) -> Solver:
    """A solver instance from an instance or a name in :data:`SOLVERS`."""
    if isinstance(solver, Solver):
        return solver
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a Solver or one of {', '.join(map(repr, SOLVERS))}; got "
                        f"{type(solver).__name__}")
    check_choice("solver", "solver", solver, tuple(SOLVERS))
    return SOLVERS[solver]()
