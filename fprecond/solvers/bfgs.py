"""Quasi-Newton updates of an inverse curvature from one pair ``(s, y)``: damped BFGS.

Used by K-BFGS (:mod:`fprecond.optimizers.kbfgs`) for each layer's output-side factor;
any method that keeps an inverse Hessian approximation from secant pairs can use them.
Every function is pure and branch-free (``torch.where``), so it runs under ``vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["POWELL", "DampedPair", "double_damping", "bfgs_inverse_update"]

POWELL = 0.2
"""``μ1`` of Powell's damping on ``H`` (the reference's constant)."""





class DampedPair(NamedTuple):
    """The pair after :func:`double_damping` and which of its two steps changed it (0-dim bools)."""

    s: torch.Tensor
    y: torch.Tensor
    powell: torch.Tensor
    levenberg_marquardt: torch.Tensor


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def double_damping(h: torch.Tensor, s: torch.Tensor, y: torch.Tensor, damping: float | torch.Tensor,
                   powell: float = POWELL) -> DampedPair:
    """The reference's double damping ("DD") of a pair ``(s, y)`` for the inverse ``H`` ``(O, O)``:

    1. Powell's damping on ``H``: if ``sᵀy < μ1 yᵀHy``, ``s ← θ s + (1 - θ) H y`` with
       ``θ = (1 - μ1) yᵀHy / (yᵀHy - sᵀy)``, so that ``sᵀy = μ1 yᵀHy``;
    2. Levenberg-Marquardt-like damping on ``H⁻¹``: if ``sᵀy < μ2 sᵀs``, ``y ← θ y + (1 - θ) s``
       with ``θ = (1 - μ2) sᵀs / (sᵀs - sᵀy)``, so that ``sᵀy = μ2 sᵀs``.

    Afterwards ``sᵀy >= μ2 sᵀs > 0`` for ``s ≠ 0``, so the BFGS update keeps ``H`` positive
    definite, and its eigenvalue along ``s`` is at most ``1/μ2``. ``μ1 = powell``,
    ``μ2 = damping`` (the reference's ``√λ``). Pure: no branching on values.
    """
    hy = h @ y
    yhy, sy = _dot(y, hy), _dot(s, y)
    powell_due = sy < powell * yhy  # false when yᵀHy = 0 (then y = 0 and Powell has nothing to fix)
    theta = torch.where(powell_due, (1.0 - powell) * yhy / torch.where(powell_due, yhy - sy, 1.0), 1.0)
    s = theta * s + (1.0 - theta) * hy
    ss, sy = _dot(s, s), _dot(s, y)
    lm_due = sy < damping * ss  # false when s = 0 (a degenerate pair, skipped later)
    theta = torch.where(lm_due, (1.0 - damping) * ss / torch.where(lm_due, ss - sy, 1.0), 1.0)
    y = theta * y + (1.0 - theta) * s
    return DampedPair(s, y, powell_due, lm_due)


def bfgs_inverse_update(h: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H⁺, applied)``: the BFGS update of the inverse ``H`` ``(O, O)``, or ``H`` for a degenerate pair.

    ``H⁺ = (I - ρ s yᵀ) H (I - ρ y sᵀ) + ρ s sᵀ = H - ρ (s uᵀ + u sᵀ) + (ρ² yᵀu + ρ) s sᵀ``
    with ``u = H y`` and ``ρ = 1/sᵀy``; exactly symmetric in floating point. It satisfies the
    secant equation ``H⁺ y = s``. The pair is applied when ``sᵀs > 0``, ``sᵀy > 0`` and
    everything is finite (``applied``, a 0-dim bool); otherwise ``H`` is kept, selected
    with ``torch.where``.
    """
    sy, ss = _dot(s, y), _dot(s, s)
    usable = (sy > 0) & (ss > 0) & torch.isfinite(sy) & torch.isfinite(ss)
    rho = 1.0 / torch.where(usable, sy, 1.0)
    u = h @ y
    cross = s.unsqueeze(-1) * u.unsqueeze(-2)
    updated = h - rho * (cross + cross.transpose(-1, -2)) + (rho * rho * _dot(y, u) + rho) * (
        s.unsqueeze(-1) * s.unsqueeze(-2))
    applied = usable & torch.isfinite(updated).all()
    return torch.where(applied, updated, h), applied
