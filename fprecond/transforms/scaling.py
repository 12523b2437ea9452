"""Scaling by a constant or by a (scheduled) learning rate."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fprecond._validation import check_number, step_counter
from fprecond.base import EmptyState, GradientTransformation, Params, ScalarOrSchedule, Updates
from fprecond.schedules import evaluate
from fprecond.tree import tree_scale

__all__ = ["scale", "scale_by_learning_rate", "ScaleByScheduleState"]


class ScaleByScheduleState(NamedTuple):
    """State of a scheduled scaling: the number of updates taken (0-dim int64)."""

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count


def scale(factor: float) -> GradientTransformation:
    """Multiply the updates by the constant ``factor``."""
    check_number("scale", "factor", factor)

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any):
        del params, extra
        return tree_scale(updates, factor), state

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply the updates by ``-learning_rate`` (``+`` when ``flip_sign=False``).

    ``learning_rate`` is a positive number or a schedule ``count -> 0-dim tensor``
    (see :mod:`fprecond.schedules`); the count is the number of previous updates,
    so the first update uses ``schedule(0)``.
    """
    check_number("scale_by_learning_rate", "learning_rate", learning_rate, low=0.0, low_inclusive=False,
                 allow_schedule=True)
    sign = -1.0 if flip_sign else 1.0
    if not callable(learning_rate):
        return scale(sign * float(learning_rate))

    def init(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=step_counter("scale_by_learning_rate", params))

    def update(updates: Updates, state: ScaleByScheduleState, params: Params | None = None, **extra: Any):
        del params, extra
        step_size = sign * evaluate(learning_rate, state.count)
        return tree_scale(updates, step_size), ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init, update)
