"""Heavy-ball and Nesterov momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

from fprecond._validation import check_number
from fprecond.base import GradientTransformation, Params, Updates
from fprecond.tree import PyTree, tree_add_scaled, tree_zeros_like

__all__ = ["trace", "TraceState"]


class TraceState(NamedTuple):
    """The running momentum buffer, shaped like the parameters."""

    trace: PyTree


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``m ← decay · m + u``; returns ``m``, or ``u + decay · m`` with Nesterov.

    With a zero initial buffer this is ``torch.optim.SGD``'s momentum with
    ``dampening=0`` (Polyak 1964; Sutskever et al. 2013 for Nesterov).
    """
    check_number("trace", "decay", decay, low=0.0, high=1.0, high_inclusive=False)

    def init(params: Params) -> TraceState:
        return TraceState(trace=tree_zeros_like(params))

    def update(updates: Updates, state: TraceState, params: Params | None = None, **extra: Any):
        del params, extra
        new_trace = tree_add_scaled(updates, state.trace, decay)
        out = tree_add_scaled(updates, new_trace, decay) if nesterov else new_trace
        return out, TraceState(trace=new_trace)

    return GradientTransformation(init, update)
