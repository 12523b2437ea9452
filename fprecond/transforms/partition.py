"""Route parameters to different transforms by label (optax's ``multi_transform``).

Methods that precondition only some parameters (Muon's hidden matrices, K-BFGS's
linear layers, SOAP's matrices) send the rest to a documented fallback with
:func:`partition` instead of dropping them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from fprecond.base import EmptyState, GradientTransformation, OptState, Params, Updates
from fprecond.tree import PyTree, tree_flatten_with_names, tree_leaves, tree_unflatten_ordered

__all__ = ["partition", "Labels"]

Labels = PyTree | Callable[[Params], PyTree]
"""A tree of label strings shaped like the parameters, or a function of the parameters returning one."""


def _flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """``(names, leaves, treedef)`` in insertion order: a leaf's name is its dict key
    for a flat dict, its dotted path otherwise."""
    return tree_flatten_with_names(tree)


def partition(transforms: Mapping[str, GradientTransformation], labels: Labels) -> GradientTransformation:
    """Apply ``transforms[label]`` to the parameters labelled ``label``.

    Each inner transform sees the updates, its state and the parameters restricted
    to its own leaves, as a flat dict keyed by the leaf's name (the parameter name
    for the usual flat ``{name: tensor}`` params, the dotted tree path otherwise),
    and every extra keyword argument. The state is a dict ``label -> inner state``.

    Args:
        transforms: label -> transform. A label with no leaves is not called (its state
            is an ``EmptyState``): many transforms cannot be built for an empty tree.
        labels: a tree shaped like the parameters with a label string per leaf, or a
            function ``params -> labels`` (evaluated at ``init`` and at each update,
            so it must depend on static properties only: names, shapes, ``ndim``).

    Raises:
        ValueError: at ``init``, naming the parameter whose label has no transform
            or whose labels tree does not match the parameters.

    Example::

        opt = partition({"muon": muon_chain, "adamw": fp.adamw(3e-4)},
                        lambda p: {k: "muon" if v.ndim == 2 else "adamw" for k, v in p.items()})
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError("partition: transforms must be a non-empty mapping label -> GradientTransformation")
    for label, transform in transforms.items():
        if not isinstance(label, str) or not isinstance(transform, GradientTransformation):
            raise TypeError(f"partition: expected str -> GradientTransformation, got {label!r} -> "
                            f"{type(transform).__name__}")

    def label_of(params: Params) -> dict[str, str]:
        """Leaf name -> label, checked against the transforms."""
        tree = labels(params) if callable(labels) else labels
        names = _flatten(params)[0]
        values = tree_leaves(tree)
        if len(values) != len(names):
            raise ValueError(f"partition: labels have {len(values)} leaves, the parameters {len(names)}")
        for name, label in zip(names, values):
            if label not in transforms:
                raise ValueError(f"partition: parameter {name!r} has label {label!r}, which has no transform "
                                 f"(known: {sorted(transforms)})")
        return dict(zip(names, values))

    def split(tree: PyTree, labelled: dict[str, str]) -> dict[str, dict[str, Any]]:
        names, leaves, _ = _flatten(tree)
        groups: dict[str, dict[str, Any]] = {label: {} for label in transforms}
        for name, leaf in zip(names, leaves):
            if name not in labelled:
                raise ValueError(f"partition: leaf {name!r} is not among the labelled parameters")
            groups[labelled[name]][name] = leaf
        return groups

    def init(params: Params) -> dict[str, OptState]:
        groups = split(params, label_of(params))
        return {label: transform.init(groups[label]) if groups[label] else EmptyState()
                for label, transform in transforms.items()}

    def update(updates: Updates, state: dict[str, OptState], params: Params | None = None, **extra: Any):
        labelled = label_of(params if params is not None else updates)
        names, _, treedef = _flatten(updates)
        update_groups = split(updates, labelled)
        param_groups = split(params, labelled) if params is not None else None
        new_state: dict[str, OptState] = {}
        results: dict[str, torch.Tensor] = {}
        for label, transform in transforms.items():
            if not update_groups[label]:
                new_state[label] = state[label]
                continue
            inner_params = param_groups[label] if param_groups is not None else None
            inner_updates, new_state[label] = transform.update(update_groups[label], state[label], inner_params,
                                                               **extra)
            results.update(inner_updates)
        return tree_unflatten_ordered(treedef, [results[name] for name in names]), new_state

    return GradientTransformation(init, update)
