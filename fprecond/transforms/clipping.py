"""Gradient clipping."""

from __future__ import annotations

from typing import Any

import torch

from fprecond._validation import check_number
from fprecond.base import EmptyState, GradientTransformation, Params, Updates
from fprecond.tree import tree_global_norm, tree_scale

__all__ = ["clip_by_global_norm"]


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale the updates to global norm ``max_norm`` when their norm exceeds it
    (Pascanu et al. 2013): ``u · min(1, max_norm / ||u||)``."""
    check_number("clip_by_global_norm", "max_norm", max_norm, low=0.0, low_inclusive=False)

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any):
        del params, extra
        norm = tree_global_norm(updates)
        # where() instead of an if keeps the step vmappable; the unselected branch
        # may be inf for a zero norm, which where() discards.
        factor = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
        return tree_scale(updates, factor), state

    return GradientTransformation(init, update)
