"""Spectral helpers shared by every module that needs them.

- :func:`symmetric_eigh`: LAPACK's symmetric eigensolver can fail to converge on
  finite matrices whose entries are huge (after a divergent step, say) and reads
  only one triangle of an input that is symmetric only up to rounding. Dividing
  by the largest entry first and symmetrising makes both harmless; eigenvalues
  are scaled back. Where float32's solver still fails to converge, the matrix is
  decomposed in float64 and the result cast back.
- :func:`damped_power`: ``(f(λ) + damping)^exponent`` of eigenvalues with one
  policy for singular input: for negative exponents the damped values are
  floored (:func:`singular_floor`), so an undamped singular matrix gives large,
  finite results.
"""

from __future__ import annotations

import torch

__all__ = ["symmetric_eigh", "singular_floor", "damped_power"]


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, vectors)`` of the symmetric part of ``(..., n, n)`` ``matrix``
    (ascending values, as ``torch.linalg.eigh``).

    A matrix with NaN/Inf entries gets NaN eigenvalues (and identity eigenvectors)
    instead of LAPACK's error, which would stop the whole batch, or every member of
    a ``vmap``; callers that check for finite results then reject it."""
    finite = torch.isfinite(matrix).all(-1, keepdim=True).all(-2, keepdim=True)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    matrix = torch.where(finite, matrix, eye)
    scale = matrix.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(matrix.dtype).tiny)
    scaled = matrix / scale
    symmetric = (scaled + scaled.transpose(-1, -2)) / 2
    try:
        values, vectors = torch.linalg.eigh(symmetric)
    except torch.linalg.LinAlgError:
        # float32 syevd can fail to converge on finite, rank-deficient matrices with clustered
        # eigenvalues (K-FAC factors of wide layers from small batches); float64 converges.
        if symmetric.dtype == torch.float64:
            raise
        values, vectors = torch.linalg.eigh(symmetric.to(torch.float64))
        values, vectors = values.to(symmetric.dtype), vectors.to(symmetric.dtype)
    values = torch.where(finite[..., 0], values * scale[..., 0], torch.nan)
    return values, vectors


def singular_floor(scale: torch.Tensor, size: int, exponent: float = -1.0) -> torch.Tensor:
    """The smallest damped eigenvalue a negative power may see: ``eps · size · scale``
    (``scale`` the largest ``|λ|`` of the matrix), and at least an absolute floor whose
    power stays below ``1/√tiny`` (~1e154 in float64, ~1e19 in float32), so that
    products with the result stay finite even for a zero matrix."""
    tiny = torch.finfo(scale.dtype).tiny
    absolute = max(tiny ** (1.0 / (2.0 * max(abs(exponent), 1e-300))), tiny)
    return (scale * size * torch.finfo(scale.dtype).eps).clamp_min(absolute)


def damped_power(values: torch.Tensor, damping: torch.Tensor | float, exponent: float, eigenvalues: str = "clamp",
                 *, scale: torch.Tensor | None = None, size: int | None = None) -> torch.Tensor:
    """``(f(values) + damping)^exponent`` with ``f`` a clamp at zero (``"clamp"``) or
    ``abs`` (``"abs"``, saddle-free Newton).

    For negative exponents the damped values are floored at
    :func:`singular_floor` of ``scale`` (default: the largest ``|values|`` over the
    last dimension, one matrix's eigenvalues) and ``size`` (default: the last
    dimension); for other exponents they are clamped at zero, so a negative
    damping never gives NaN roots.
    """
    damped = (values.abs() if eigenvalues == "abs" else values.clamp(min=0.0)) + damping
    if exponent >= 0:
        return damped.clamp(min=0.0).pow(exponent)
    if scale is None:
        scale = values.abs().amax(dim=-1, keepdim=True) if values.numel() else values.new_zeros(())
    floor = singular_floor(scale, values.shape[-1] if size is None else size, exponent)
    return torch.maximum(damped, floor).pow(exponent)
