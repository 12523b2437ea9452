"""The transform type and its combinators, in the manner of optax.

A :class:`GradientTransformation` is a pair of pure functions::

    state = transform.init(params)
    updates, state = transform.update(grads, state, params, **extra)
    params = apply_updates(params, updates)

``update`` never modifies its arguments and never branches in Python on tensor
values, so ``torch.func.vmap`` over an ensemble of ``(params, state)`` gives what
a loop over the members gives. States hold tensor leaves only (0-dim tensors for
step counters) and are NamedTuples, dicts or :func:`fprecond.tree.pytree_dataclass`
classes.

Extra keyword arguments (``batch=...``, ``key=...``) are passed to every link of
a chain; a transform ignores the ones it does not use. A transform that needs one
declares it with :func:`require_extras` and raises a ``TypeError`` naming the
transform and the argument when it is missing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Protocol

import torch

from fprecond._validation import check_parameters, check_updates
from fprecond.tree import PyTree, tree_map

__all__ = [
    "Params",
    "Updates",
    "OptState",
    "Schedule",
    "ScalarOrSchedule",
    "TransformInit",
    "TransformUpdate",
    "GradientTransformation",
    "EmptyState",
    "identity",
    "chain",
    "named_chain",
    "apply_updates",
    "require_extras",
    "require_params",
    "validated",
]

Params = PyTree
Updates = PyTree
OptState = PyTree
Schedule = Callable[[torch.Tensor], torch.Tensor]
"""A function of the 0-dim integer step count returning a 0-dim tensor."""
ScalarOrSchedule = float | Schedule


class TransformInit(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdate(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure gradient transformation: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra) -> (updates, state)``."""

    init: TransformInit
    update: TransformUpdate


class EmptyState(NamedTuple):
    """The state of a transform that keeps nothing."""


def identity() -> GradientTransformation:
    """A transform that returns the updates unchanged."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any):
        del params, extra
        return updates, state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other; the state is the tuple of their states.

    ``params`` and every extra keyword argument are passed to each link.
    """
    for index, transform in enumerate(transforms):
        if not isinstance(transform, GradientTransformation):
            raise TypeError(
                f"chain: argument {index} is a {type(transform).__name__}, expected a GradientTransformation"
            )

    def init(params: Params) -> tuple[OptState, ...]:
        return tuple(transform.init(params) for transform in transforms)

    def update(updates: Updates, state: tuple, params: Params | None = None, **extra: Any):
        if len(state) != len(transforms):
            raise ValueError(f"chain: state has {len(state)} entries for {len(transforms)} transforms")
        new_state = []
        for transform, inner_state in zip(transforms, state):
            updates, inner_state = transform.update(updates, inner_state, params, **extra)
            new_state.append(inner_state)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def named_chain(*named_transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with a state dict keyed by name (``state["kfac"]``).

    Example::

        opt = named_chain(("clip", clip_by_global_norm(1.0)), ("adam", scale_by_adam()),
                          ("lr", scale_by_learning_rate(1e-3)))
        state = opt.init(params)
        state["adam"].mu   # the first moment
    """
    names = [name for name, _ in named_transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: names must be unique, got {names}")
    for name, transform in named_transforms:
        if not isinstance(name, str) or not isinstance(transform, GradientTransformation):
            raise TypeError(f"named_chain: expected (str, GradientTransformation) pairs, got ({name!r}, {type(transform).__name__})")

    def init(params: Params) -> dict[str, OptState]:
        return {name: transform.init(params) for name, transform in named_transforms}

    def update(updates: Updates, state: dict, params: Params | None = None, **extra: Any):
        new_state = {}
        for name, transform in named_transforms:
            updates, new_state[name] = transform.update(updates, state[name], params, **extra)
        return updates, new_state

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates`` leaf-wise (out of place), in each parameter's dtype."""
    return tree_map(lambda p, u: (p + u).to(p.dtype), params, updates)


def require_extras(transform_name: str, *names: str) -> Callable[[TransformUpdate], TransformUpdate]:
    """Decorate an ``update`` that needs keyword extras ``names`` (e.g. ``"batch"``).

    A missing extra raises ``TypeError`` naming the transform and the argument at
    the first call, instead of failing deep inside the computation.
    """

    def decorate(update: TransformUpdate) -> TransformUpdate:
        @functools.wraps(update)
        def checked(updates: Updates, state: OptState, params: Params | None = None, **extra: Any):
            missing = [name for name in names if extra.get(name) is None]
            if missing:
                listed = ", ".join(repr(name) for name in missing)
                raise TypeError(
                    f"{transform_name}.update() needs the keyword argument(s) {listed}; "
                    f"pass them to the update of the chain, e.g. update(grads, state, params, {missing[0]}=...)"
                )
            return update(updates, state, params, **extra)

        return checked

    return decorate


def require_params(transform_name: str, params: Params | None) -> Params:
    """Return ``params``, raising a clear ``TypeError`` when a transform that needs them got None."""
    if params is None:
        raise TypeError(f"{transform_name}.update() needs the current parameters: call update(grads, state, params)")
    return params


def validated(name: str, transform: GradientTransformation) -> GradientTransformation:
    """``transform`` with its inputs checked, for recipes (the outermost transform a user calls).

    ``init`` rejects parameters that are not real floating-point tensors on one device
    (:func:`fprecond._validation.check_parameters`); ``update`` rejects gradients whose
    tree structure, shapes or dtypes differ from the parameters' when ``params`` is
    given (:func:`fprecond._validation.check_updates`). Errors name ``name`` and the
    parameter at fault and come before any computation. The checks depend on shapes
    and dtypes only, so ``vmap`` and ``torch.compile`` see the same function.
    """
    def init(params: Params) -> OptState:
        check_parameters(name, params)
        return transform.init(params)

    def update(updates: Updates, state: OptState, params: Params | None = None, **extra: Any):
        if params is not None:
            check_updates(name, updates, params)
        return transform.update(updates, state, params, **extra)

    return GradientTransformation(init, update)
