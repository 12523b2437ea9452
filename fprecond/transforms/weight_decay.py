"""Weight decay added to the updates."""

from __future__ import annotations

from typing import Any, Callable

from fprecond._validation import check_number
from fprecond.base import EmptyState, GradientTransformation, Params, Updates, require_params
from fprecond.tree import PyTree, tree_map

__all__ = ["add_decayed_weights"]

Mask = PyTree | Callable[[Params], PyTree]


def add_decayed_weights(weight_decay: float, mask: Mask | None = None) -> GradientTransformation:
    """Add ``weight_decay · params`` to the updates.

    Placed before a preconditioner it is L2 regularisation (``torch.optim.SGD``/
    ``Adam`` with ``weight_decay``); placed after it and before the learning rate
    it is decoupled weight decay (Loshchilov & Hutter 2019, ``AdamW``).

    Args:
        weight_decay: the non-negative coefficient.
        mask: a tree of Python bools shaped like the parameters (or a function of
            the parameters returning one); ``False`` leaves are not decayed
            (e.g. biases and norm scales).
    """
    check_number("add_decayed_weights", "weight_decay", weight_decay, low=0.0)

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any):
        del extra
        params = require_params("add_decayed_weights", params)
        leaf_mask = mask(params) if callable(mask) else mask
        if leaf_mask is None:
            return tree_map(lambda u, p: u + weight_decay * p, updates, params), state
        return tree_map(lambda u, p, m: u + weight_decay * p if m else u, updates, params, leaf_mask), state

    return GradientTransformation(init, update)
