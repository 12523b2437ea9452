"""Step-size (and damping) schedules: pure functions of the 0-dim step count.

Every schedule maps a 0-dim integer tensor ``count`` (the number of updates
already taken) to a 0-dim float64 tensor, using only tensor ops (``clamp``,
``where``), so it works under ``torch.func.vmap`` and ``torch.compile``. Values
are computed in float64 and take the dtype of the updates they multiply.
"""

from __future__ import annotations

import math

import torch

from fprecond.base import Schedule

__all__ = [
    "constant_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "exponential_decay",
    "evaluate",
]


def _as_float(count: torch.Tensor) -> torch.Tensor:
    return count.to(torch.float64)


def evaluate(value: float | Schedule, count: torch.Tensor) -> torch.Tensor:
    """The value of a number-or-schedule at step ``count`` as a 0-dim float64 tensor."""
    if callable(value):
        return torch.as_tensor(value(count), dtype=torch.float64, device=count.device)
    return torch.full((), float(value), dtype=torch.float64, device=count.device)


def constant_schedule(value: float) -> Schedule:
    """``value`` at every step."""

    def schedule(count: torch.Tensor) -> torch.Tensor:
        return torch.full_like(_as_float(count), value)

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear interpolation from ``init_value`` to ``end_value`` over ``transition_steps``
    steps starting at ``transition_begin``; constant before and after."""
    if transition_steps <= 0:
        raise ValueError(f"linear_schedule: transition_steps must be positive, got {transition_steps}")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        fraction = ((_as_float(count) - transition_begin) / transition_steps).clamp(0.0, 1.0)
        return init_value + (end_value - init_value) * fraction

    return schedule


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay (Loshchilov & Hutter 2017) from ``init_value`` to ``alpha * init_value``
    over ``decay_steps`` steps, then constant."""
    if decay_steps <= 0:
        raise ValueError(f"cosine_decay_schedule: decay_steps must be positive, got {decay_steps}")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        fraction = (_as_float(count) / decay_steps).clamp(0.0, 1.0)
        cosine = 0.5 * (1.0 + torch.cos(math.pi * fraction))
        return init_value * ((1.0 - alpha) * cosine + alpha)

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0
) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value`` at step ``decay_steps`` (counted from the start)."""
    if not 0 <= warmup_steps < decay_steps:
        raise ValueError(
            f"warmup_cosine_decay_schedule: need 0 <= warmup_steps < decay_steps, got {warmup_steps}, {decay_steps}"
        )

    def schedule(count: torch.Tensor) -> torch.Tensor:
        step = _as_float(count)
        warm = init_value + (peak_value - init_value) * (step / max(warmup_steps, 1)).clamp(0.0, 1.0)
        fraction = ((step - warmup_steps) / (decay_steps - warmup_steps)).clamp(0.0, 1.0)
        decayed = end_value + (peak_value - end_value) * 0.5 * (1.0 + torch.cos(math.pi * fraction))
        return torch.where(step < warmup_steps, warm, decayed)

    return schedule


def exponential_decay(
    init_value: float, decay_rate: float, transition_steps: int, staircase: bool = False, end_value: float | None = None
) -> Schedule:
    """``init_value * decay_rate ** (count / transition_steps)`` (floored when ``staircase``),
    bounded by ``end_value`` when given."""
    if transition_steps <= 0:
        raise ValueError(f"exponential_decay: transition_steps must be positive, got {transition_steps}")
    if decay_rate <= 0:
        raise ValueError(f"exponential_decay: decay_rate must be positive, got {decay_rate}")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        exponent = _as_float(count) / transition_steps
        if staircase:
            exponent = torch.floor(exponent)
        value = init_value * torch.pow(torch.full_like(exponent, decay_rate), exponent)
        if end_value is not None:
            value = value.clamp(min=end_value) if decay_rate < 1 else value.clamp(max=end_value)
        return value

    return schedule
