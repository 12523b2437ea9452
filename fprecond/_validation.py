"""Argument checks shared by constructors: raise early, name the argument."""

from __future__ import annotations

import math
from typing import Any, Iterable

import optree
import torch

from fprecond.tree import NAMESPACE, PyTree, tree_flatten_with_names, tree_leaves


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


def _checks_apply() -> bool:
    """Value-independent checks run eagerly; under ``torch.compile`` they were already
    run on the first (eager or traced) call and would only cost graph breaks."""
    return not torch.compiler.is_compiling()


def inspectable_values(tensor: torch.Tensor) -> torch.Tensor | None:
    """The values behind ``tensor`` for a check that reads them, or None where reading
    them would cost or fail.

    Inside ``torch.func`` transforms a tensor is a wrapper; the plain tensor under
    the wrappers holds the same values (under ``vmap``, every member's values at
    once), so a range check on it is a check of every member. None under
    ``torch.compile`` and off the CPU: on an accelerator a check would force a host
    synchronisation on every step; the kernels' own asserts remain there.
    """
    if not _checks_apply():
        return None
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        tensor = functorch.get_unwrapped(tensor)
    if tensor.device.type != "cpu" or type(tensor) is not torch.Tensor:
        return None
    return tensor


def check_parameters(owner: str, params: PyTree) -> None:
    """Raise unless every leaf of ``params`` is a real floating-point tensor on one device.

    Called at ``init``: integer, boolean and complex parameters have no meaningful
    preconditioned step (the curvature code assumes a real inner product), and
    parameters spread over devices would fail deep inside a matmul. Raises
    ``TypeError``/``ValueError`` naming the leaf.
    """
    if not _checks_apply():
        return
    names, leaves, _ = tree_flatten_with_names(params)
    if not leaves:
        raise ValueError(f"{owner}: the parameter tree is empty")
    device = None
    first = ""
    for name, leaf in zip(names, leaves):
        label = name or "<root>"
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{owner}: parameter {label!r} is a {type(leaf).__name__}, expected a tensor")
        if not leaf.dtype.is_floating_point:
            raise TypeError(f"{owner}: parameter {label!r} has dtype {leaf.dtype}; parameters must be real "
                            "floating point (float64, float32, float16 or bfloat16)")
        if device is None:
            device, first = leaf.device, label
        elif leaf.device != device:
            raise ValueError(f"{owner}: parameter {label!r} is on {leaf.device} but {first!r} is on {device}; "
                             "move all parameters to one device")


def _sorted_name(tree: PyTree, index: int) -> str:
    """The dotted path of leaf ``index`` in optree's (sorted-key) order."""
    paths = optree.tree_paths(tree, namespace=NAMESPACE)
    return ".".join(str(part) for part in paths[index]) or "<root>"


def check_updates(owner: str, updates: PyTree, params: PyTree) -> None:
    """Raise unless ``updates`` (gradients) have the tree structure, shapes and dtypes of ``params``.

    Called at every ``update`` before any computation, so a mismatch names the leaf
    instead of surfacing as a shape error inside a solver. The happy path costs one
    flatten of each tree and a comparison per leaf.
    """
    if not _checks_apply():
        return
    # optree's flatten (C++, dict keys sorted) for the comparison; names only for a message.
    update_leaves, update_spec = optree.tree_flatten(updates, namespace=NAMESPACE)
    param_leaves, param_spec = optree.tree_flatten(params, namespace=NAMESPACE)
    if update_spec != param_spec:
        update_names = tree_flatten_with_names(updates)[0]
        param_names = tree_flatten_with_names(params)[0]
        missing = [name for name in param_names if name not in update_names]
        extra = [name for name in update_names if name not in param_names]
        detail = f"missing {missing}, unexpected {extra}" if missing or extra else "the containers differ"
        raise ValueError(f"{owner}: the gradients do not have the structure of the parameters ({detail})")
    for index, (update, param) in enumerate(zip(update_leaves, param_leaves)):
        if not isinstance(update, torch.Tensor):
            raise TypeError(f"{owner}: gradient {_sorted_name(params, index)!r} is a {type(update).__name__}, "
                            "expected a tensor")
        if update.shape != param.shape or update.dtype != param.dtype:
            name = _sorted_name(params, index)
            if update.shape != param.shape:
                raise ValueError(f"{owner}: gradient {name!r} has shape {tuple(update.shape)}, the parameter has "
                                 f"shape {tuple(param.shape)}")
            raise TypeError(f"{owner}: gradient {name!r} has dtype {update.dtype}, the parameter has dtype "
                            f"{param.dtype}; cast the gradients to the parameters' dtype")
