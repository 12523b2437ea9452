"""The top eigenpairs of a curvature matrix, matrix-free: Lanczos or power iteration.

``lanczos`` (default): Ritz pairs of ``m`` steps of :func:`~fprecond.analysis.lanczos.lanczos`
with full reorthogonalisation from a random start — ``θ_k`` of ``T = S diag(θ) Sᵀ``
and ``u_k = Q s_k``, with the residual ``||C u_k − θ_k u_k|| = |β_m S_mk|``
(Golub & Van Loan, *Matrix Computations*, §10.1.4) at no extra product. Extreme
eigenvalues converge first, and at ``m = P`` the pairs are exact. This is how
PyHessian (Yao et al. 2020) and Ghorbani, Krishnan & Xiao (2019) get the top of
a network's Hessian spectrum.

``power``: power iteration (von Mises) with deflation by projection. Pair ``i``
iterates ``u ← P_i (C + σ I) u / ||·||`` with ``P_i = I − U_iU_iᵀ`` projecting out
the pairs found before, for a fixed number of steps, and reports the Rayleigh
quotient ``λ_i = u_iᵀ C u_i``. Plain power iteration finds the eigenvalue of
largest magnitude; for the largest *algebraic* eigenvalues of an indefinite
matrix (a Hessian) the shift ``σ`` is an estimate of the spectral radius
``||C u|| ≈ max|λ|`` from a preliminary power run, which makes ``C + σ I``
(nearly) positive semi-definite. Convergence is linear, with ratio
``|λ_{i+1} + σ| / |λ_i + σ|``: simpler, slower than Lanczos.

All functions are pure (the start vectors come from an explicit key through
:mod:`fprecond.random`) and loop a fixed number of times, so they work under
``torch.func.vmap``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import torch

from fprecond import random as random_keys
from fprecond._validation import check_choice
from fprecond.analysis.lanczos import check_count, lanczos_flat, ritz_pairs
from fprecond.analysis.operators import CurvatureKind, Mvp, curvature_mvp, flatten_mvp, unravel_rows
from fprecond.modeling import Model
from fprecond.tree import PyTree

__all__ = ["Eigenpairs", "top_eigenpairs", "curvature_eigenpairs"]

Method = Literal["lanczos", "power"]
Which = Literal["algebraic", "magnitude"]


class Eigenpairs(NamedTuple):
    """``k`` eigenpairs, in descending order of value (``"algebraic"``) or of ``|value|`` (``"magnitude"``).

    Attributes:
        values: ``(k,)`` eigenvalue estimates.
        vectors: unit eigenvectors as one tree shaped like the parameters whose
            leaves have a leading dimension ``k`` (sign fixed so that each vector's
            entry of largest magnitude is positive).
        residuals: ``(k,)`` residual norms ``||C u − λ u||`` (an eigenvalue error bound
            for symmetric ``C``: some eigenvalue lies within it).
    """

    values: torch.Tensor
    vectors: PyTree
    residuals: torch.Tensor


def _fix_signs(rows: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its entry of largest magnitude is positive (a canonical sign)."""
    pivot = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    return rows * torch.where(pivot < 0, -1.0, 1.0)


def _normalized(vector: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``vector / ||vector||``, or ``fallback`` where the norm is too small to divide by."""
    norm = torch.linalg.vector_norm(vector)
    usable = norm > torch.finfo(vector.dtype).tiny
    return torch.where(usable, vector / torch.where(usable, norm, 1.0), fallback)


def _lanczos_pairs(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, k: int, iterations: int,
                   which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alphas, betas, basis = lanczos_flat(matvec, start, iterations)
    theta, vectors = ritz_pairs(alphas, betas)
    if which == "algebraic":
        index = torch.arange(iterations - 1, iterations - 1 - k, -1, device=theta.device)
    else:
        index = torch.topk(theta.abs(), k).indices
    values = theta.gather(0, index)
    chosen = vectors.index_select(1, index)  # (m, k) Ritz coefficients
    rows = chosen.transpose(0, 1) @ basis
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    residuals = (betas[-1] * chosen[-1]).abs()
    return values, rows / norms, residuals


def _power_pairs(matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, k: int, iterations: int,
                 which: str, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = like.shape[-1]
    found = like.new_zeros((k, size))

    def project(vector: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
        return vector - found.transpose(0, 1) @ (found @ vector)

    def start(index: int, found: torch.Tensor) -> torch.Tensor:
        draw = random_keys.normal(random_keys.fold_in(key, index), (size,), dtype=like.dtype).to(like.device)
        return _normalized(project(draw, found), draw)

    def iterate(vector: torch.Tensor, found: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        for _ in range(iterations):
            # Projecting after the product keeps the iterate in the deflated subspace despite rounding.
            vector = _normalized(project(matvec(vector) + shift * vector, found), vector)
        return vector

    shift = like.new_zeros(())
    if which == "algebraic":
        radius_vector = iterate(start(k, found), found, shift)
        shift = torch.linalg.vector_norm(matvec(radius_vector))
    values, residuals = [], []
    for index in range(k):
        vector = iterate(start(index, found), found, shift)
        product = matvec(vector)
        value = torch.dot(vector, product)
        values.append(value)
        residuals.append(torch.linalg.vector_norm(product - value * vector))
        mask = torch.arange(k, device=like.device) == index
        found = torch.where(mask[:, None], vector, found)
    return torch.stack(values), found, torch.stack(residuals)


def top_eigenpairs(mvp: Mvp, like: PyTree, k: int, *, key: torch.Tensor, iterations: int = 100,
                   method: Method = "lanczos", which: Which = "algebraic") -> Eigenpairs:
    """The ``k`` largest eigenvalues of the symmetric operator ``C`` (``mvp``) and their eigenvectors.

    Args:
        mvp: ``v ↦ C v`` on pytrees shaped like ``like`` (e.g. :func:`curvature_mvp`),
            or on flat tensors with a flat ``like``.
        like: a tree with the shapes and the dtype of the vectors (e.g. ``params``).
        k: number of pairs, ``1 <= k <= min(iterations, P)`` for Lanczos, ``<= P`` for power.
        key: an :mod:`fprecond.random` key for the start vectors (Lanczos: ``normal(key)``;
            power: ``normal(fold_in(key, i))`` for pair ``i``, ``fold_in(key, k)`` for the
            shift's run).
        iterations: Lanczos steps ``m`` (reduced to ``P``, where Lanczos is exact;
            default 100 as PyHessian's ``maxIter``), or power steps per pair.
        method: ``"lanczos"`` (default) or ``"power"`` (see the module docstring).
        which: ``"algebraic"`` (largest values, default) or ``"magnitude"`` (largest ``|value|``).

    Returns:
        An :class:`Eigenpairs` ``(values, vectors, residuals)``. Cost: ``m`` products
        (Lanczos); ``k (iterations + 1)`` products, plus ``iterations + 1`` for
        ``"algebraic"`` (power).

    Example::

        pairs = top_eigenpairs(curvature_mvp(md, params, batch, "hessian"), params, 3, key=fp.random.key(0))
        pairs.values            # (3,), descending
        pairs.vectors["0.weight"].shape  # (3, *params["0.weight"].shape)
    """
    owner = "top_eigenpairs"
    check_count(owner, "k", k)
    check_count(owner, "iterations", iterations)
    check_choice(owner, "method", method, ("lanczos", "power"))
    check_choice(owner, "which", which, ("algebraic", "magnitude"))
    matvec, flat_like, unravel = flatten_mvp(mvp, like)
    size = flat_like.shape[-1]
    if method == "lanczos":
        steps = min(iterations, size)
        if k > steps:
            raise ValueError(f"{owner}: k must be <= min(iterations, dimension) = {steps} for Lanczos, got {k}")
        start = random_keys.normal(key, (size,), dtype=flat_like.dtype).to(flat_like.device)
        values, rows, residuals = _lanczos_pairs(matvec, start, k, steps, which)
    else:
        if k > size:
            raise ValueError(f"{owner}: k must be <= the dimension {size}, got {k}")
        random_keys.fold_in(key, 0)  # validates the key before any product
        values, rows, residuals = _power_pairs(matvec, flat_like, k, iterations, which, key)
    return Eigenpairs(values, unravel_rows(_fix_signs(rows), unravel), residuals)


def curvature_eigenpairs(model: Model, params: dict[str, torch.Tensor], batch: Any, k: int, *, key: torch.Tensor,
                         kind: CurvatureKind = "hessian", per: str = "example", iterations: int = 100,
                         method: Method = "lanczos", which: Which = "algebraic") -> Eigenpairs:
    """:func:`top_eigenpairs` of ``curvature_mvp(model, params, batch, kind, per=per)``.

    The vectors are shaped like ``params`` (with a leading ``k``); see :func:`top_eigenpairs`
    and :func:`~fprecond.analysis.operators.curvature_mvp` for the arguments.
    """
    return top_eigenpairs(curvature_mvp(model, params, batch, kind, per=per), params, k, key=key,
                          iterations=iterations, method=method, which=which)
