"""Argument checks shared by constructors: raise early, name the argument."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from fprecond.tree import PyTree, tree_leaves


def check_number(owner: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True, allow_schedule: bool = False) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``value`` is a finite number in the given range.

    A callable passes when ``allow_schedule`` (it is a schedule of the step count).
    """
    if allow_schedule and callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number or a schedule" if allow_schedule else "a number"
        raise TypeError(f"{owner}: {name} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{owner}: {name} must be {bound} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"{owner}: {name} must be {bound} {high}, got {value}")


def check_positive_int(owner: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ``>= 1`` (not a bool), or None when
    ``allow_none``: intervals, counts and sizes."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``, listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def first_leaf(owner: str, tree: PyTree) -> torch.Tensor:
    """The first tensor leaf of ``tree``; a clear error for an empty tree."""
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{owner}: the parameter tree is empty")
    return leaves[0]


def step_counter(owner: str, params: PyTree) -> torch.Tensor:
    """A 0-dim int64 step count of zero on the device of the parameters."""
    return torch.zeros((), dtype=torch.int64, device=first_leaf(owner, params).device)
