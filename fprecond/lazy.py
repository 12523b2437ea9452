"""Skip work that a mask says is not needed, without changing any result.

``lazy_where(mask, compute, otherwise)`` means exactly
``tree_where(mask, compute(), otherwise)``: a pure, vmappable selection. It
only avoids work: when the mask's concrete value can be read and is all
``False``, ``compute`` is not called; when it is all ``True``, no selection is
made. Under ``torch.func.vmap`` the mask is batched and is read through the
transform's wrappers, so an ensemble whose members all skip an expensive step
(an inverse on an off-step of a schedule, a Cholesky retry nobody needs) skips
it, and a mixed ensemble computes it once for all members and selects per
member. Where no concrete value exists (``torch.compile`` tracing, the ``meta``
device) both branches are computed and selected, which is still correct.

This is how preconditioner schedules stay pure functions of the state (the step
count lives in the state as a tensor) while off-steps cost only the cheap
product with the cached inverse.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch._C import _functorch

from fprecond.tree import tree_where

__all__ = ["concrete", "lazy_where"]

T = TypeVar("T")


def concrete(tensor: torch.Tensor) -> torch.Tensor | None:
    """The plain tensor under any ``vmap``/``grad`` wrappers of ``tensor``, or None when
    its values are not available (tracing, fake or meta tensors).

    Under ``vmap`` the result holds the values of every member (in some order).
    """
    try:
        compiling = torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        compiling = False
    if compiling:
        return None
    while _functorch.is_functorch_wrapped_tensor(tensor):
        if _functorch.is_functionaltensor(tensor):
            return None
        tensor = _functorch.get_unwrapped(tensor)
    if tensor.device.type == "meta" or type(tensor).__name__ == "FakeTensor":
        return None
    return tensor


def lazy_where(mask: torch.Tensor, compute: Callable[[], T], otherwise: T) -> T:
    """``tree_where(mask, compute(), otherwise)``, calling ``compute`` only when some
    member's ``mask`` is (or may be) true.

    Args:
        mask: a boolean tensor broadcastable against every leaf (a 0-dim flag, or
            one flag per matrix of a batch).
        compute: builds a pytree with the structure, shapes and dtypes of ``otherwise``.
        otherwise: the value kept where ``mask`` is false.
    """
    values = concrete(mask)
    if values is not None:
        if not bool(values.any()):
            return otherwise
        if bool(values.all()):
            return compute()
    return tree_where(mask, compute(), otherwise)
