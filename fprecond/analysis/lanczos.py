"""The symmetric Lanczos process, matrix-free, with full reorthogonalisation and
restarts at breakdown, and the Gauss quadrature it defines.

Lanczos (1950); Golub & Van Loan, *Matrix Computations* (4th ed.), §10.1 and
§10.3 (full reorthogonalisation); Golub & Meurant, *Matrices, Moments and
Quadrature* (2010) for the quadrature.

From a unit vector ``q_1`` the process builds an orthonormal basis
``Q_m = [q_1 … q_m]`` of the Krylov space ``span{q_1, C q_1, …, C^{m-1} q_1}``
and the tridiagonal ``T_m = Q_mᵀ C Q_m`` (diagonal ``α``, off-diagonal ``β``)::

    w = C q_j − α_j q_j − β_{j-1} q_{j-1},   α_j = q_jᵀ C q_j,
    β_j = ||w||,   q_{j+1} = w / β_j,
    C Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ.

In floating point the ``q_j`` lose orthogonality as Ritz values converge (Paige
1971), which creates spurious copies of converged eigenvalues; full
reorthogonalisation (classical Gram-Schmidt against all of ``Q``, applied twice:
"twice is enough", Giraud et al. 2005) keeps ``Q`` orthonormal to rounding, at
``O(m P)`` extra work per step, negligible next to a curvature product.

**Breakdown.** When ``β_j = 0`` (to rounding: ``β_j <= P·eps·max_i ||C q_i||``)
the Krylov space is invariant, and ``w / β_j`` would be ``0/0``. The process then
restarts with a unit vector orthogonal to ``Q`` and records ``β_j = 0``, so ``T``
splits into blocks, each exact for its invariant subspace, and ``C Q = Q T + …``
still holds. The restart vector is deterministic (no key): the coordinate vector
``e_i`` least covered by ``Q`` (smallest ``Σ_k Q_ki²``), orthogonalised against
``Q`` — its norm² is at least ``(P − j)/P``, so it never vanishes while
``j < P``. A restart block's eigenvectors have a zero first component, so it adds
nothing to the quadrature of ``q_1``, while its Ritz values are genuine
eigenvalues of ``C`` (with multiplicity, which a single Krylov space cannot see).
A zero starting vector starts from such a restart vector.

Everything is a fixed-length loop of tensor operations (no Python branch on a
tensor value): the functions are pure and work under ``torch.func.vmap`` over
starting vectors (the restart goes through :func:`~fprecond.lazy.lazy_where`, so
it costs nothing when no member breaks down).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from fprecond.analysis.operators import Mvp, flatten_mvp, unravel_rows
from fprecond.lazy import lazy_where
from fprecond.spectral import symmetric_eigh
from fprecond.tree import PyTree

__all__ = ["LanczosResult", "lanczos", "lanczos_flat", "tridiagonal", "ritz_pairs", "lanczos_quadrature"]


class LanczosResult(NamedTuple):
    """What :func:`lanczos` returns (unpack as ``alphas, betas, basis = lanczos(...)``).

    Attributes:
        alphas: ``(m,)`` diagonal of ``T``.
        betas: ``(m,)``: ``betas[:-1]`` is the off-diagonal of ``T`` (``betas[j]``
            couples ``q_j`` and ``q_{j+1}``, 0 at a restart) and ``betas[-1] = β_m``
            is the norm of the final residual in ``C Q = Q T + β_m q_{m+1} e_mᵀ``.
        basis: the ``q_j`` as one tree shaped like ``v0`` whose leaves have a
            leading dimension ``m`` (orthonormal with reorthogonalisation).
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    basis: PyTree


def check_count(owner: str, name: str, value: object, low: int = 1) -> int:
    """Raise unless ``value`` is an int ``>= low`` (bools rejected); return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{owner}: {name} must be >= {low}, got {value}")
    return value


def tridiagonal(alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """The ``(m, m)`` Lanczos matrix ``T`` from :class:`LanczosResult`'s ``alphas`` and
    ``betas`` (``(m,)`` each, the last ``beta`` is the residual and is not part of ``T``)."""
    off = betas[..., :-1]
    return torch.diag_embed(alphas) + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)


def _project_out(basis: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``(I − Qᵀ Q) v`` for ``(m, P)`` rows ``Q`` (rows not yet filled are zero)."""
    return vector - basis.transpose(0, 1) @ (basis @ vector)


def _restart_vector(basis: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to the rows of ``basis`` (see the module docstring)."""
    size = basis.shape[-1]
    coverage = (basis * basis).sum(dim=0)
    index = torch.argmin(coverage)
    candidate = (torch.arange(size, device=basis.device) == index).to(basis.dtype)
    candidate = _project_out(basis, _project_out(basis, candidate))
    norm = torch.linalg.vector_norm(candidate)
    return candidate / norm.clamp_min(torch.finfo(basis.dtype).tiny)


def _set_row(matrix: torch.Tensor, row: int, vector: torch.Tensor) -> torch.Tensor:
    mask = torch.arange(matrix.shape[0], device=matrix.device) == row
    return torch.where(mask[:, None], vector, matrix)


def lanczos_flat(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, iterations: int,
                 reorthogonalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`lanczos` on flat vectors: ``(alphas (m,), betas (m,), basis (m, P))``.

    ``start`` is ``(P,)`` and need not be normalised; ``iterations <= P`` is the
    caller's to check.
    """
    size = start.shape[-1]
    finfo = torch.finfo(start.dtype)
    breakdown_tol = size * finfo.eps
    basis = start.new_zeros((iterations, size))
    norm = torch.linalg.vector_norm(start)
    usable = norm > finfo.tiny
    # A zero start (or one too small to normalise) starts from a restart vector instead.
    q = lazy_where(~usable, functools.partial(_restart_vector, basis), start / torch.where(usable, norm, 1.0))
    basis = _set_row(basis, 0, q)
    previous = torch.zeros_like(q)
    beta_previous = norm.new_zeros(())
    scale = norm.new_zeros(())
    alphas, betas = [], []
    for j in range(iterations):
        w = matvec(q)
        scale = torch.maximum(scale, torch.linalg.vector_norm(w))
        alpha = torch.dot(q, w)
        w = w - alpha * q - beta_previous * previous
        if reorthogonalize:
            w = _project_out(basis, _project_out(basis, w))
        beta = torch.linalg.vector_norm(w)
        alphas.append(alpha)
        if j + 1 < iterations:
            # Invariant subspace (to rounding): restart orthogonally instead of dividing 0 by 0.
            broken = beta <= breakdown_tol * scale
            following = lazy_where(broken, functools.partial(_restart_vector, basis),
                                   w / torch.where(broken, 1.0, beta))
            beta = torch.where(broken, 0.0, beta)
            basis = _set_row(basis, j + 1, following)
            previous, q, beta_previous = q, following, beta
        betas.append(beta)
    return torch.stack(alphas), torch.stack(betas), basis


def lanczos(mvp: Mvp, v0: PyTree, iterations: int, *, reorthogonalize: bool = True) -> LanczosResult:
    """``m = iterations`` steps of the Lanczos process for the symmetric operator ``mvp`` from ``v0``.

    See the module docstring for the recurrence, the reorthogonalisation and the
    restarts at breakdown (no NaN for invariant subspaces, repeated eigenvalues, a
    zero operator or a zero ``v0``). Costs ``m`` products with ``C``.

    Args:
        mvp: ``v ↦ C v`` on pytrees shaped like ``v0`` (e.g. :func:`curvature_mvp`),
            ``C`` symmetric.
        v0: the starting vector (any nonzero scale; normalised here), a pytree of
            tensors of one dtype, or a flat tensor.
        iterations: ``m``, with ``1 <= m <= P`` (``P`` the number of entries of ``v0``;
            at ``m = P`` the process is exact: ``T`` is similar to ``C``).
        reorthogonalize: full reorthogonalisation (default); ``False`` gives the
            plain three-term recurrence (cheaper, ``Q`` loses orthogonality and
            converged Ritz values repeat).

    Returns:
        A :class:`LanczosResult` ``(alphas, betas, basis)``; ``T = tridiagonal(alphas, betas)``.

    Example::

        alphas, betas, basis = lanczos(curvature_mvp(md, params, batch, "ggn"), params, 20)
        ritz_values = torch.linalg.eigvalsh(tridiagonal(alphas, betas))
    """
    owner = "lanczos"
    check_count(owner, "iterations", iterations)
    matvec, start, unravel = flatten_mvp(mvp, v0)
    size = start.shape[-1]
    if iterations > size:
        raise ValueError(f"{owner}: iterations must be <= the dimension {size} (exact there), got {iterations}")
    alphas, betas, rows = lanczos_flat(matvec, start, iterations, reorthogonalize)
    return LanczosResult(alphas, betas, unravel_rows(rows, unravel))


def ritz_pairs(alphas: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, ``(m,)``) and eigenvectors (columns, ``(m, m)``) of ``T``."""
    return symmetric_eigh(tridiagonal(alphas, betas))


def lanczos_quadrature(mvp: Mvp, v: PyTree, iterations: int, *,
                       reorthogonalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the ``m``-point Gauss quadrature of ``v``'s spectral measure.

    With ``u = v/||v||``, ``C = Σ_i λ_i x_i x_iᵀ`` and ``T = S diag(θ) Sᵀ`` from
    ``m`` Lanczos steps started at ``u``: nodes ``θ_k`` and weights
    ``τ_k = S_1k²`` (``Σ_k τ_k = 1``) satisfy

        ``uᵀ f(C) u = Σ_i (x_iᵀ u)² f(λ_i) ≈ Σ_k τ_k f(θ_k)``,

    exactly for every polynomial ``f`` of degree ``<= 2m − 1`` (Golub & Meurant
    2010, Thm. 6.2), so the weighted moments ``Σ_k τ_k θ_k^j`` equal
    ``vᵀ C^j v / vᵀ v`` for ``j <= 2m − 1``. The building block of stochastic
    Lanczos quadrature (:func:`~fprecond.analysis.density.spectral_density`).

    Args:
        mvp, v, iterations, reorthogonalize: as in :func:`lanczos` (``v`` plays ``v0``).

    Returns:
        ``(nodes, weights)``, each ``(m,)``, nodes ascending.
    """
    owner = "lanczos_quadrature"
    check_count(owner, "iterations", iterations)
    matvec, start, _ = flatten_mvp(mvp, v)
    if iterations > start.shape[-1]:
        raise ValueError(f"{owner}: iterations must be <= the dimension {start.shape[-1]}, got {iterations}")
    alphas, betas, _ = lanczos_flat(matvec, start, iterations, reorthogonalize)
    nodes, vectors = ritz_pairs(alphas, betas)
    return nodes, vectors[0] ** 2
