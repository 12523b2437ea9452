"""Running a transform in a wider floating-point type than the parameters.

Parameters held in bfloat16 (or float16) keep a preconditioner's factors, moments
and solves in float32 through :func:`with_precision`: the wrapped transform sees
float32 copies of the gradients, the parameters and the floating-point tensors of
the ``batch`` extra, keeps a float32 state, and its updates are cast back to each
parameter's dtype. Besides accuracy this is what makes the curvature recipes run at
all on bfloat16 parameters: ``torch.linalg``'s Cholesky, ``eigh`` and triangular
solves have no bfloat16 kernels on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from fprecond.base import GradientTransformation, OptState, Params, Updates
from fprecond.tree import PyTree, tree_map

__all__ = ["with_precision"]


def _widen(tree: PyTree, dtype: torch.dtype) -> PyTree:
    """Floating-point leaves narrower than ``dtype`` cast to it; other leaves as they are."""

    def widen(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dtype.itemsize < dtype.itemsize:
            return leaf.to(dtype)
        return leaf

    return tree_map(widen, tree)


def with_precision(inner: GradientTransformation, dtype: torch.dtype = torch.float32) -> GradientTransformation:
    """Run ``inner`` in ``dtype`` for parameters narrower than it (bfloat16, float16).

    ``init(params) = inner.init(widen(params))``; ``update`` passes ``widen(grads)``,
    ``widen(params)`` and a ``batch`` extra whose floating-point tensors are widened
    (integer targets and tokens are kept), and casts each update back to its
    gradient's dtype. Leaves already as wide as ``dtype`` are passed as they are, so
    for float32 or float64 parameters the wrapper changes nothing.

    The model's forward passes inside ``inner`` (curvature estimates) then run on the
    widened parameters and inputs: the module's buffers, if any, must be of a dtype
    its layers accept with ``dtype`` inputs.

    Example::

        opt = with_precision(fp.kfac(md))          # bfloat16 parameters, float32 K-FAC factors
        state = opt.init(params)                    # a float32 state
        updates, state = opt.update(grads, state, params, batch=batch, key=key)   # bfloat16 updates
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"with_precision: inner must be a GradientTransformation, got {type(inner).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"with_precision: dtype must be a real floating-point torch.dtype, got {dtype!r}")

    def init(params: Params) -> OptState:
        return inner.init(_widen(params, dtype))

    def update(updates: Updates, state: OptState, params: Params | None = None, **extra: Any):
        if extra.get("batch") is not None:
            extra = {**extra, "batch": _widen(extra["batch"], dtype)}
        wide_params = None if params is None else _widen(params, dtype)
        new_updates, new_state = inner.update(_widen(updates, dtype), state, wide_params, **extra)
        return tree_map(lambda u, g: u.to(g.dtype), new_updates, updates), new_state

    return GradientTransformation(init, update)
