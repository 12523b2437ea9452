"""A scaled, symmetrised eigendecomposition shared by every module that needs one.

LAPACK's symmetric eigensolver can fail to converge on finite matrices whose
entries are huge (after a divergent step, say) and reads only one triangle of
an input that is symmetric only up to rounding. Dividing by the largest entry
first and symmetrising makes both harmless; eigenvalues are scaled back.
"""

from __future__ import annotations

import torch

__all__ = ["symmetric_eigh"]


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, vectors)`` of the symmetric part of ``(..., n, n)`` ``matrix``
    (ascending values, as ``torch.linalg.eigh``)."""
    scale = matrix.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(matrix.dtype).tiny)
    scaled = matrix / scale
    values, vectors = torch.linalg.eigh((scaled + scaled.transpose(-1, -2)) / 2)
    return values * scale[..., 0], vectors
