"""Skipping steps whose gradients or updates are not finite."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fprecond.base import GradientTransformation, OptState, Params, Updates
from fprecond._validation import step_counter
from fprecond.lazy import lazy_where
from fprecond.tree import tree_all_finite, tree_leaves, tree_zeros_like

__all__ = ["apply_if_finite", "ApplyIfFiniteState"]


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
        skipped: total number of skipped steps (0-dim int64).
        consecutive_skipped: skipped steps since the last finite one.
        last_finite: whether the last step was applied (0-dim bool).
        inner_state: the wrapped transform's state (unchanged by skipped steps).
    """

    skipped: torch.Tensor
    consecutive_skipped: torch.Tensor
    last_finite: torch.Tensor
    inner_state: OptState


def apply_if_finite(inner: GradientTransformation) -> GradientTransformation:
    """Run ``inner`` and keep its result only when the incoming updates and the
    outgoing ones are all finite.

    On a non-finite step the returned update is zero (so ``apply_updates`` leaves
    the parameters as they are), ``inner``'s state is kept as it was, and the skip
    counters grow. The choice is made with ``torch.where`` (through
    :func:`fprecond.lazy.lazy_where`, which skips it when every step is finite), so
    under ``vmap`` one ensemble member's NaN does not skip the others' steps.
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"apply_if_finite: inner must be a GradientTransformation, got {type(inner).__name__}")

    def init(params: Params) -> ApplyIfFiniteState:
        # A partition may hand an inner recipe no parameters at all: count on the CPU then.
        leaves = tree_leaves(params)
        zero = step_counter("apply_if_finite", params) if leaves else torch.zeros((), dtype=torch.int64)
        return ApplyIfFiniteState(
            skipped=zero,
            consecutive_skipped=zero.clone(),
            last_finite=torch.ones((), dtype=torch.bool, device=zero.device),
            inner_state=inner.init(params),
        )

    def update(updates: Updates, state: ApplyIfFiniteState, params: Params | None = None, **extra: Any):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra)
        finite = tree_all_finite(updates) & tree_all_finite(new_updates)
        # lazy_where: the selection (a copy of the whole inner state) only runs when some
        # member's step is not finite; the result is the same either way.
        skip = ~finite
        out = lazy_where(skip, lambda: tree_zeros_like(new_updates), new_updates)
        kept_inner = lazy_where(skip, lambda: state.inner_state, new_inner)
        skipped_now = (~finite).to(state.skipped.dtype)
        new_state = ApplyIfFiniteState(
            skipped=state.skipped + skipped_now,
            consecutive_skipped=(state.consecutive_skipped + 1) * skipped_now,
            last_finite=finite,
            inner_state=kept_inner,
        )
        return out, new_state

    return GradientTransformation(init, update)
