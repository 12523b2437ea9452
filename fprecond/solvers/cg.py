"""Matrix-free conjugate gradient on pytrees, with a fixed budget and masking."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from fprecond._validation import check_number
from fprecond.lazy import lazy_where
from fprecond.tree import (PyTree, tree_add_scaled, tree_leaves, tree_map, tree_sub, tree_vdot, tree_where,
                           tree_zeros_like)

__all__ = ["CGInfo", "conjugate_gradient"]


class CGInfo(NamedTuple):
    """What :func:`conjugate_gradient` did (0-dim tensors, batched under ``vmap``).

    Attributes:
        iterations: int64, steps that updated ``x``.
        residual: ``||rhs − A x|| / ||rhs||`` of the returned ``x`` (the absolute
            ``||A x||`` when ``rhs`` is zero); the recursively updated residual.
        negative_curvature: bool, a direction with ``pᵀ A p <= 0`` was met (and
            the iteration stopped before it).
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    negative_curvature: torch.Tensor


def conjugate_gradient(matvec: Callable[[PyTree], PyTree], rhs: PyTree, *, x0: PyTree | None = None,
                       iterations: int = 50, preconditioner: Callable[[PyTree], PyTree] | None = None,
                       tol: float = 1e-10) -> tuple[PyTree, CGInfo]:
    """Solve ``A x = rhs`` by (preconditioned) conjugate gradients on pytrees.

    Hestenes & Stiefel (1952); matrix-free as in Hessian-free optimisation
    (Martens, 2010). ``A`` (through ``matvec``) should be symmetric positive
    definite, e.g. a damped curvature; ``preconditioner(r) ≈ A^-1 r`` must be SPD.
    The budget is a fixed ``iterations``; a member stops (its ``x`` no longer
    changes) once ``||r|| <= tol · ||rhs||``, or when it meets a direction of
    non-positive curvature ``pᵀ A p <= 0``, where, as Martens does, it keeps the
    ``x`` it has rather than step along that direction. Denominators are guarded,
    so a zero ``rhs`` returns ``x0`` (zero by default) without NaN. Steps are taken
    through :func:`~fprecond.lazy.lazy_where`, so once every member has stopped
    the remaining iterations cost no ``matvec``.

    Args:
        matvec: ``v ↦ A v`` on trees shaped like ``rhs`` (a pure function).
        rhs: a pytree of tensors (e.g. a ``{name: tensor}`` gradient dict).
        x0: the starting point (zeros by default; one extra ``matvec`` otherwise).
        iterations: the budget (``>= 0``); exact in ``P`` steps in exact arithmetic.
        preconditioner: ``r ↦ M r`` with ``M ≈ A^-1`` SPD (PCG), or ``None``.
        tol: relative residual tolerance (``>= 0``).

    Returns:
        ``(x, info)`` with ``x`` shaped like ``rhs`` and ``info`` a :class:`CGInfo`.
    """
    owner = "conjugate_gradient"
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{owner}: iterations must be an int >= 0, got {iterations!r}")
    check_number(owner, "tol", tol, low=0.0)
    precondition = preconditioner if preconditioner is not None else (lambda vector: vector)

    if x0 is None:
        x, residual = tree_zeros_like(rhs), rhs
    else:
        x, residual = x0, tree_sub(rhs, matvec(x0))
    # CG is linear in (rhs, x0): it runs on them divided by a power of two near their
    # largest entry and multiplies the solution back. The inner products square the
    # entries, which would overflow for a float32 gradient of 1e30 (or underflow for
    # 1e-30); a power of two divides exactly, so ordinary inputs give bit for bit the
    # same result.
    scale = _power_of_two_scale(rhs, residual, x)
    rhs, residual, x = (tree_map(lambda leaf: leaf / scale.to(leaf.dtype), tree) for tree in (rhs, residual, x))
    rhs_norm = torch.sqrt(tree_vdot(rhs, rhs))
    threshold = tol * rhs_norm
    residual_norm = torch.sqrt(tree_vdot(residual, residual))
    z = precondition(residual)
    direction = z
    rz = tree_vdot(residual, z)
    count = torch.zeros((), dtype=torch.int64, device=rz.device)
    done = residual_norm <= threshold
    negative = torch.zeros_like(done)
    state = (x, residual, direction, rz, residual_norm, count, done, negative)

    def step(state: tuple) -> tuple:
        x, residual, direction, rz, residual_norm, count, done, negative = state
        product = matvec(direction)
        curvature = tree_vdot(direction, product)
        negative_now = ~done & (curvature <= 0)
        active = ~done & ~negative_now
        alpha = torch.where(active, rz / torch.where(active, curvature, torch.ones_like(curvature)), 0.0)
        new_x = tree_add_scaled(x, direction, alpha)
        new_residual = tree_add_scaled(residual, product, -alpha)
        new_norm = torch.sqrt(tree_vdot(new_residual, new_residual))
        new_z = precondition(new_residual)
        new_rz = tree_vdot(new_residual, new_z)
        safe_rz = torch.where(active & (rz != 0), rz, torch.ones_like(rz))
        beta = torch.where(active, new_rz / safe_rz, 0.0)
        new_direction = tree_add_scaled(new_z, direction, beta)
        new = (new_x, new_residual, new_direction, new_rz, new_norm, count + 1,
               done | negative_now | (new_norm <= threshold), negative | negative_now)
        kept = (x, residual, direction, rz, residual_norm, count, done | negative_now, negative | negative_now)
        return tree_where(active, new, kept)

    for _ in range(iterations):
        state = lazy_where(~state[6], functools.partial(step, state), state)
    x, _, _, _, residual_norm, count, _, negative = state
    positive_norm = torch.where(rhs_norm > 0, rhs_norm, torch.ones_like(rhs_norm))
    x = tree_map(lambda leaf: leaf * scale.to(leaf.dtype), x)
    return x, CGInfo(count, residual_norm / positive_norm, negative)


def _power_of_two_scale(*trees: PyTree) -> torch.Tensor:
    """``2^⌊log2 m⌋`` for ``m`` the largest ``|entry|`` of ``trees`` (0-dim, in the first
    leaf's dtype); 1 when ``m`` is zero or not finite (a NaN input stays NaN)."""
    leaves = [leaf for tree in trees for leaf in tree_leaves(tree)]
    if not leaves:
        return torch.ones(())
    dtype = leaves[0].dtype
    largest = torch.stack([(leaf.abs().amax() if leaf.numel() else leaf.new_zeros(())).to(dtype)
                           for leaf in leaves]).amax()
    scale = torch.exp2(torch.floor(torch.log2(largest)))
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
