"""The math of PSGD's preconditioner factors: fitting ``Q`` on a pair ``(v, h)`` and applying ``P = QᵀQ``.

Li (2018, "Preconditioned stochastic gradient descent", IEEE TNNLS) fits ``P = QᵀQ``
to pairs ``(v, h)`` — a parameter perturbation and the gradient's response to it,
``h ≈ H v`` — by minimising the criterion

    ``c(P) = E[hᵀ P h + vᵀ P⁻¹ v]``,

whose minimiser is ``P = H⁻¹`` for a fixed SPD ``H`` and ``E[v vᵀ] = I`` (and
``|H|⁻¹`` for an indefinite one). ``Q`` lives in the group of upper-triangular
matrices with positive diagonal (Li 2019, "Preconditioner on matrix Lie group for
SGD"), and each step is the multiplicative (Lie-group) gradient step

    ``a = Q h``,  ``b = Q⁻ᵀ v``,  ``∇ = triu(a aᵀ - b bᵀ)``,
    ``Q ← Q - μ ∇ Q``  with  ``μ = precond_lr / (max|∇| + tiny)``,

as ``update_precond_dense`` of ``lixilinx/psgd_torch``. The normalised step keeps
``|μ ∇_ii| ≤ precond_lr < 1``, so the diagonal of ``Q`` stays positive.

The Kronecker version (``update_precond_kron`` there) keeps, for a matrix
parameter ``G`` of shape ``(m, n)``, a left factor ``Q_l`` (``m × m``) and a right
factor ``Q_r`` (``n × n``) with ``Q = Q_r ⊗ Q_l`` in column-major ``vec``, i.e.
``P vec(G) = vec(Q_lᵀ Q_l G Q_rᵀ Q_r)``:

    balance ``ρ = sqrt(max diag Q_l / max diag Q_r)``, ``Q_l ← Q_l / ρ``, ``Q_r ← Q_r ρ``;
    ``A = Q_l dG Q_rᵀ``,  ``B = Q_l⁻ᵀ dX Q_r⁻¹``;
    ``∇_l = triu(A Aᵀ - B Bᵀ)``,  ``∇_r = triu(Aᵀ A - Bᵀ B)``;
    ``Q_l ← Q_l - μ_l ∇_l Q_l``,  ``Q_r ← Q_r - μ_r ∇_r Q_r`` with each ``μ`` normalised as above.

A side of size 1 (a vector's ``(n, 1)`` form, a weight with one output) is a pure
scale that the other factor already carries, and is not fitted (the left one is,
for a scalar parameter); see :func:`kron_factor_update`.

A factor may be diagonal (stored as a vector ``q``); then its gradient is the
diagonal of the dense one, ``Σ_j A_ij² - Σ_j B_ij²`` (rows for the left, columns for
the right factor), and the step is ``q ← q - μ ∇ ⊙ q`` (the reference's
"scaling" factor, ``_update_precond_dense_scale``).

Numerics: before the outer products ``a`` and ``b`` (``A`` and ``B``) are divided
by their common largest magnitude. ``∇`` then changes by a positive factor, which
the normalised step ``μ`` cancels exactly (up to the ``tiny`` in its floor), so the
update is the reference's while gradients of size 1e30 or 1e-30 neither overflow
nor underflow in the squares.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "KronFactors",
    "matrix_shape",
    "init_kron_factors",
    "dense_factor_update",
    "dense_precondition",
    "kron_factor_update",
    "kron_precondition",
    "pair_scale",
]


class KronFactors(NamedTuple):
    """The two factors of one tensor's Kronecker preconditioner ``P = (Q_rᵀQ_r) ⊗ (Q_lᵀQ_l)``.

    Each is an upper-triangular matrix (2-D) or the diagonal of a diagonal one (1-D).
    """

    left: torch.Tensor
    right: torch.Tensor


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The matrix a tensor of ``shape`` is preconditioned as.

    A scalar is ``(1, 1)``, a vector of length ``n`` is ``(n, 1)``, and a tensor of
    order ≥ 2 is ``(shape[0], prod(shape[1:]))``: a Linear weight stays ``(out, in)``
    and a convolution kernel ``(O, C, kh, kw)`` becomes ``(O, C·kh·kw)``, as ASDL's
    Kron-PSGD reshapes it.
    """
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return int(shape[0]), 1
    return int(shape[0]), math.prod([int(s) for s in shape[1:]])  # a list: torch.compile rejects a generator here


def init_kron_factors(shape: torch.Size | tuple[int, ...], max_size: int | None, scale: float,
                      dtype: torch.dtype, device: torch.device) -> KronFactors:
    """``Q = scale · I`` split as ``sqrt(scale) I`` per factor (Li's ``initQ``).

    A factor is triangular when the tensor has order ≥ 2 and its side has
    ``1 < size ≤ max_size``; otherwise (vectors, scalars, unit sides, sides over
    ``max_size``) it is diagonal.
    """
    rows, cols = matrix_shape(shape)
    root = math.sqrt(scale)

    def factor(size: int) -> torch.Tensor:
        triangular = len(shape) >= 2 and 1 < size and (max_size is None or size <= max_size)
        if triangular:
            return root * torch.eye(size, dtype=dtype, device=device)
        return torch.full((size,), root, dtype=dtype, device=device)

    return KronFactors(factor(rows), factor(cols))


def pair_scale(v_norm: torch.Tensor, h_norm: torch.Tensor) -> torch.Tensor:
    """Li's initial scale of ``Q``: ``(vᵀv / hᵀh)^(1/4) = sqrt(‖v‖ / ‖h‖)``, so that
    ``P = QᵀQ`` matches the pair's magnitude; 1 when the ratio is unusable (``h = 0``: no
    information yet; or a subnormal ``h`` whose ratio overflows)."""
    usable = (h_norm > 0) & torch.isfinite(h_norm)
    ratio = v_norm / torch.where(usable, h_norm, torch.ones_like(h_norm))
    usable = usable & torch.isfinite(ratio)
    return torch.where(usable, torch.sqrt(torch.where(usable, ratio, torch.ones_like(ratio))), torch.ones_like(ratio))


def _normalise_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b) / max(max|a|, max|b|)``: the normalised step cancels the factor (see module doc)."""
    tiny = torch.finfo(a.dtype).tiny
    peak = torch.maximum(a.abs().amax(), b.abs().amax()).clamp_min(tiny)
    return a / peak, b / peak


def _normalised_step(gradient: torch.Tensor, precond_lr: float) -> torch.Tensor:
    """``precond_lr / (max|∇| + tiny)``."""
    return precond_lr / (gradient.abs().amax() + torch.finfo(gradient.dtype).tiny)


def dense_factor_update(q: torch.Tensor, v: torch.Tensor, h: torch.Tensor, precond_lr: float) -> torch.Tensor:
    """One Lie-group step of the dense factor ``Q`` (``n × n``, upper triangular) on the pair ``(v, h)``
    (vectors of length ``n``): ``Q - μ triu(a aᵀ - b bᵀ) Q`` with ``a = Q h``, ``b = Q⁻ᵀ v``."""
    a = q @ h
    b = torch.linalg.solve_triangular(q.mT, v.unsqueeze(-1), upper=False).squeeze(-1)
    a, b = _normalise_pair(a, b)
    gradient = torch.triu(torch.outer(a, a) - torch.outer(b, b))  # formed for max|∇| only
    # ∇ Q without the O(n³) product: (triu(a aᵀ) Q)_ik = a_i Σ_{j≥i} a_j Q_jk, a suffix sum.
    return q - _normalised_step(gradient, precond_lr) * _triu_rank_two_times(a, b, q)


def _triu_rank_two_times(a: torch.Tensor, b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``triu(a aᵀ - b bᵀ) Q`` in ``O(n²)`` through suffix sums over the rows of ``diag(a) Q``.

    The sums run along the last dimension of ``Qᵀ`` (contiguous in memory: a cumulative
    sum down the rows of a row-major matrix is several times slower on CPU).
    """
    weights = torch.stack([a, b])  # (2, n)
    columns = q.mT.unsqueeze(0) * weights.unsqueeze(-2)  # [s, k, j] = Q_jk w_sj
    suffix = columns.flip(-1).cumsum(-1).flip(-1)  # [s, k, i] = Σ_{j≥i} Q_jk w_sj
    scaled = suffix * weights.unsqueeze(-2)
    return (scaled[0] - scaled[1]).mT


def dense_precondition(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``P g = Qᵀ (Q g)`` for a flat gradient ``g`` of length ``n``."""
    return q.mT @ (q @ g)


def _diagonal(factor: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(factor) if factor.dim() == 2 else factor


def _balance(factors: KronFactors) -> KronFactors:
    """Rescale ``Q_l / ρ``, ``Q_r ρ`` with ``ρ = sqrt(max diag Q_l / max diag Q_r)`` (``P`` is unchanged):
    keeps the two factors' scales equal so neither drifts to over- or underflow."""
    left, right = factors
    tiny = torch.finfo(left.dtype).tiny
    rho = torch.sqrt(_diagonal(left).amax().clamp_min(tiny) / _diagonal(right).amax().clamp_min(tiny))
    return KronFactors(left / rho, right * rho)


def _left_times(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Q_l X``."""
    return factor @ x if factor.dim() == 2 else factor.unsqueeze(-1) * x


def _times_right_t(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``X Q_rᵀ``."""
    return x @ factor.mT if factor.dim() == 2 else x * factor


def _left_t_solve(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Q_l⁻ᵀ X``."""
    if factor.dim() == 2:
        return torch.linalg.solve_triangular(factor.mT, x, upper=False)
    return x / factor.unsqueeze(-1)


def _right_solve(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``X Q_r⁻¹``."""
    if factor.dim() == 2:
        return torch.linalg.solve_triangular(factor, x, upper=True, left=False)
    return x / factor


def _factor_step(factor: torch.Tensor, a: torch.Tensor, b: torch.Tensor, side: int,
                 precond_lr: float) -> torch.Tensor:
    """The Lie-group step of one factor; ``side`` 0 for the left (rows), 1 for the right (columns)."""
    if factor.dim() == 2:
        if side == 0:
            gradient = torch.triu(a @ a.mT - b @ b.mT)
        else:
            gradient = torch.triu(a.mT @ a - b.mT @ b)
        return factor - _normalised_step(gradient, precond_lr) * (gradient @ factor)
    reduce = 1 - side  # the left factor sums over columns, the right one over rows
    gradient = (a * a).sum(dim=reduce) - (b * b).sum(dim=reduce)
    return factor - _normalised_step(gradient, precond_lr) * gradient * factor


def kron_factor_update(factors: KronFactors, dx: torch.Tensor, dg: torch.Tensor,
                       precond_lr: float) -> KronFactors:
    """One step of both Kronecker factors on the matrix pair ``(dX, dG)`` (shape ``(m, n)``):
    balance, ``A = Q_l dG Q_rᵀ``, ``B = Q_l⁻ᵀ dX Q_r⁻¹``, then each factor's Lie-group step
    (both from the same ``A``, ``B``, as the reference)."""
    left, right = _balance(factors)
    a = _times_right_t(_left_times(left, dg), right)
    b = _right_solve(_left_t_solve(left, dx), right)
    a, b = _normalise_pair(a, b)
    # A side of size 1 holds only a scale, which the other factor fits already; it is kept
    # (the left one of a scalar is fitted). Fitting it too, as the reference does for a
    # vector's scalar side, adds nothing, and after the on-the-fly initial scale its gradient
    # ΣA² - ΣB² is exactly zero, so the normalised step would follow rounding noise (±precond_lr).
    keep_right = right.numel() == 1
    keep_left = left.numel() == 1 and not keep_right
    new_left = left if keep_left else _factor_step(left, a, b, 0, precond_lr)
    new_right = right if keep_right else _factor_step(right, a, b, 1, precond_lr)
    return KronFactors(new_left, new_right)


def kron_precondition(factors: KronFactors, g: torch.Tensor) -> torch.Tensor:
    """``Q_lᵀ Q_l G Q_rᵀ Q_r`` for a matrix gradient ``G`` of shape ``(m, n)``."""
    left, right = factors
    if left.dim() == 2:
        g = left.mT @ (left @ g)
    else:
        g = (left * left).unsqueeze(-1) * g
    if right.dim() == 2:
        return (g @ right.mT) @ right
    return g * (right * right)
