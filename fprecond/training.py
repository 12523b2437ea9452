"""One training step as a pure function: gradients, the transform's update, the new parameters.

``train_step(model, transform)`` returns ``step(params, state, batch, key) ->
(params, state, metrics)``, which is exactly::

    loss, grads = fprecond.loss_and_grads(model, params, batch)
    updates, state = transform.update(grads, state, params, batch=batch, key=key)
    params = fprecond.apply_updates(params, updates)

plus a few 0-dim metrics. The step keeps nothing between calls, so it can be

- called as is, carrying ``(params, state)`` in a loop;
- mapped over an ensemble with ``torch.func.vmap`` (stacked params, states and
  keys; the batch shared or one per member), see :mod:`fprecond.ensemble`;
- compiled with ``torch.compile(step, fullgraph=True)`` where the transform is
  compile-clean (see :func:`train_step` for which recipes are).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import grad_and_value

from fprecond.base import GradientTransformation, OptState, Params, apply_updates
from fprecond.modeling import Model
from fprecond.transforms.finite import ApplyIfFiniteState
from fprecond.tree import tree_global_norm

__all__ = ["train_step", "Step", "Metrics"]

Metrics = dict[str, torch.Tensor]
Step = Callable[[Params, OptState, Any, Any], tuple[Params, OptState, Metrics]]


def _skipped(state: OptState, like: torch.Tensor) -> torch.Tensor:
    # Only the outermost guard is read: every recipe wraps its chain in one
    # apply_if_finite, and a guard nested deeper would be an unusual construction.
    if isinstance(state, ApplyIfFiniteState):
        return state.skipped
    return torch.zeros((), dtype=torch.int64, device=like.device)


def train_step(model: Model, transform: GradientTransformation, *,
               buffers: dict[str, torch.Tensor] | None = None) -> Step:
    """A pure training step of ``transform`` on ``model``'s loss.

    ``step(params, state, batch, key) -> (params, state, metrics)`` computes the
    batch loss ``L(θ)`` and its gradient ``g = ∇_θ L`` (one forward, one backward,
    as :func:`fprecond.loss_and_grads`), then
    ``u, state' = transform.update(g, state, θ, batch=batch, key=key)`` and
    ``θ' = θ + u`` (:func:`fprecond.apply_updates`). Nothing is modified in place.

    Args:
        model: the model and loss (:func:`fprecond.model`).
        transform: any gradient transformation; its ``update`` receives ``batch=``
            and ``key=`` (and ``buffers=`` when given), which the curvature
            recipes need and the others ignore.
        buffers: module buffers (e.g. BatchNorm running statistics, in ``eval()``
            mode) used by the forward pass; None takes those of ``model.module``.
            They are constants of the step, shared by every ensemble member.

    ``key`` is an :func:`fprecond.random.key` (the recipes fold it with their step
    count, so one key per run suffices) or None for transforms that draw nothing.

    Returns:
        ``step``, whose ``metrics`` are 0-dim tensors computed from the step's own
        values: ``loss`` (``L(θ)`` before the update), ``grad_norm`` (the global
        Euclidean norm ``‖g‖`` of the raw gradient, over all parameters) and
        ``skipped`` (int64: the cumulative number of steps skipped by
        :func:`fprecond.apply_if_finite` when ``transform`` is wrapped in it, as
        every recipe is — its state's ``skipped`` after this step; 0 for
        transforms without that guard, e.g. a bare ``fp.chain(...)``).

    Compiling: ``torch.compile(step, fullgraph=True)`` traces the step into one
    graph for ``sgd``, ``adam`` and the curvature recipes that get their
    curvature from autodiff products or gradient statistics: ``sophia``,
    ``adahessian``, ``psgd``, ``muon``, ``shampoo``, ``soap``, ``newton`` and
    ``newton_cg`` (``hessian_free``); ``tests/test_training.py`` checks each against
    the eager step. Scheduled work is then computed on every step and selected with
    ``torch.where`` (:mod:`fprecond.lazy`), which gives the same result. The recipes
    built on the layer taps (:mod:`fprecond.taps`: ``kfac``, ``ekfac``,
    ``natural_gradient``, ``unit_wise_ng``, ``diag_ng``, ``smw_ng``, ``seng``,
    ``kbfgs``) are not compile-clean: the taps register forward hooks on the layers
    inside every call, and dynamo cannot trace a hook's registration (its
    ``RemovableHandle``), so the graph breaks there. Without ``fullgraph`` they
    still compile, in pieces. Hooks registered once, outside the step, trace
    (checked on a prototype); that would change the taps' design, not a line.
    """
    if not isinstance(model, Model):
        raise TypeError(f"train_step: model must be an fprecond Model (fprecond.model(module, loss)), "
                        f"got {type(model).__name__}")
    if not isinstance(transform, GradientTransformation):
        raise TypeError(f"train_step: transform must be a GradientTransformation, got {type(transform).__name__}")
    if buffers is not None and not isinstance(buffers, dict):
        raise TypeError(f"train_step: buffers must be a dict name -> tensor or None, got {type(buffers).__name__}")
    extra: dict[str, Any] = {} if buffers is None else {"buffers": buffers}

    def batch_loss(params: Params, batch: Any) -> torch.Tensor:
        return model.batch_loss(params, batch, buffers)

    def step(params: Params, state: OptState, batch: Any, key: Any = None) -> tuple[Params, OptState, Metrics]:
        grads, loss = grad_and_value(batch_loss)(params, batch)
        updates, new_state = transform.update(grads, state, params, batch=batch, key=key, **extra)
        new_params = apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": tree_global_norm(grads), "skipped": _skipped(new_state, loss)}
        return new_params, new_state, metrics

    return step
