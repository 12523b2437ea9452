"""Sophia: a clipped diagonal second-order method (Liu, Li, Hall, Liang & Ma 2023,
"Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training").

Every ``update_interval`` steps (``k``) a diagonal curvature estimate ``ĥ`` is
taken on the batch and averaged, ``h ← β₂ h + (1-β₂) ĥ``; every step the gradient
is averaged, ``m ← β₁ m + (1-β₁) g``, and the step is the element-wise clipped
ratio

    ``u = clip(m / max(ρ·h, ε), -1, 1)``,  ``θ ← θ - lr · (u + wd · θ)``.

``ĥ`` is Gauss-Newton-Bartlett (``"gnb"``, Sophia-G) or Hutchinson with Gaussian
probes (``"hutchinson"``, Sophia-H); see :mod:`fprecond.curvature.hutchinson`.

Reconciling the reference (``Liuhong99/Sophia``, ``SophiaG``) and the paper:

* SophiaG keeps ``h_ref = EMA(ĝ ⊙ ĝ)`` and steps with
  ``sign(m) · min(|m| / (ρ · bs · h_ref + 1e-15), 1)``. Here the factor ``bs``
  (tokens per step) is in the estimate (``ĥ = R ĝ ⊙ ĝ``, ``R`` the loss's
  reduction factor, which is ``bs`` for a mean token loss), as in the paper's
  Algorithm 2, so ``ρ·h`` is the reference's ``ρ · bs · h_ref``.
* ``sign(m) · min(|m|/d, 1) = clip(m/d, -1, 1)`` for ``d > 0``. The denominator is
  the paper's ``max(ρ·h, ε)`` rather than SophiaG's ``ρ·h + ε``: they agree to a
  relative ``ε/(ρh)`` wherever ``ρh ≫ ε``, and ``max`` keeps a negative Hutchinson
  estimate from flipping the step's sign (it becomes a sign-momentum step, as the
  paper intends).
* The paper (Algorithm 3) refreshes ``h`` on steps ``1, k+1, 2k+1, ...`` *before*
  the update, which is what happens here (0-based counts ``0, k, 2k, ...``). The
  reference training script refreshes after the update on steps ``k-1, 2k-1, ...``,
  so its first ``k`` steps run with ``h = 0`` (pure clipped sign-momentum); later
  steps see the same estimates.
* No bias correction of ``m`` (as SophiaG and the paper; optax's contrib version
  corrects it).

Defaults are SophiaG's: ``lr = 1e-4``, ``β = (0.965, 0.99)``, ``ρ = 0.04``,
``wd = 0.1``, ``ε = 1e-15``, ``k = 10`` (the paper's and the training script's
interval). The Hutchinson variant uses the same defaults.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fprecond import random as random_keys
from fprecond._validation import check_choice, check_number, check_positive_int, step_counter
from fprecond.base import (
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Updates,
    named_chain,
    require_extras,
    require_params,
)
from fprecond.curvature.hutchinson import gnb_diagonal, hutchinson_diagonal
from fprecond.lazy import lazy_where
from fprecond.modeling import Model
from fprecond.optimizers._recipe import guarded
from fprecond.precondition import is_due
from fprecond.transforms import add_decayed_weights, scale_by_learning_rate
from fprecond.transforms.weight_decay import Mask
from fprecond.tree import PyTree, tree_map, tree_zeros_like

__all__ = ["scale_by_sophia", "sophia", "ScaleBySophiaState", "ESTIMATORS"]

ESTIMATORS = ("gnb", "hutchinson")


class ScaleBySophiaState(NamedTuple):
    """Sophia's state.

    Attributes:
        count: steps taken (0-dim int64).
        mu: the gradient's running average ``m``, shaped like the parameters.
        hessian: the running diagonal curvature estimate ``h``, shaped like the parameters.
        refreshes: number of curvature estimates taken so far (0-dim int64).
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count
    mu: PyTree
    hessian: PyTree
    refreshes: torch.Tensor


def scale_by_sophia(model: Model, *, estimator: str = "gnb", b1: float = 0.965, b2: float = 0.99,
                    rho: float = 0.04, eps: float = 1e-15, update_interval: int = 10) -> GradientTransformation:
    """Sophia's direction ``clip(m / max(ρ·h, ε), -1, 1)`` (see the module docstring).

    Args:
        model: the model and loss the curvature is estimated on.
        estimator: ``"gnb"`` (Gauss-Newton-Bartlett, ``R ĝ⊙ĝ`` on targets sampled from
            the model) or ``"hutchinson"`` (``u ⊙ (H u)``, ``u ~ N(0, I)``).
        b1: decay of the gradient average ``m``.
        b2: decay of the curvature average ``h`` (applied on refresh steps only).
        rho: ``ρ``, the scale of ``h`` in the denominator (SophiaG's ``rho``).
        eps: floor of the denominator.
        update_interval: ``k``, steps between curvature estimates (steps ``0, k, 2k, ...``).

    ``update(grads, state, params, batch=(inputs, targets), key=..., buffers=None)``:
    ``batch`` and ``key`` are required; the key is folded with the step count
    (``fprecond.random.fold_in(key, count)``), so one key per run suffices. Off-steps
    compute no estimate (:func:`fprecond.lazy.lazy_where`).
    """
    owner = "scale_by_sophia"
    if not isinstance(model, Model):
        raise TypeError(f"{owner}: model must be an fprecond Model (fprecond.model(module, loss)), "
                        f"got {type(model).__name__}")
    check_choice(owner, "estimator", estimator, ESTIMATORS)
    check_number(owner, "b1", b1, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "b2", b2, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "rho", rho, low=0.0, low_inclusive=False)
    check_number(owner, "eps", eps, low=0.0, low_inclusive=False)
    check_positive_int(owner, "update_interval", update_interval)

    def init(params: Params) -> ScaleBySophiaState:
        count = step_counter(owner, params)
        return ScaleBySophiaState(count=count, mu=tree_zeros_like(params), hessian=tree_zeros_like(params),
                                  refreshes=torch.zeros_like(count))

    @require_extras(owner, "batch", "key")
    def update(updates: Updates, state: ScaleBySophiaState, params: Params | None = None, **extra: Any):
        params = require_params(owner, params)
        batch, key, buffers = extra["batch"], extra["key"], extra.get("buffers")
        count = state.count

        def refresh() -> PyTree:
            step_key = random_keys.fold_in(key, count)
            if estimator == "gnb":
                fresh = gnb_diagonal(model, params, batch, step_key, buffers=buffers)
            else:
                fresh = hutchinson_diagonal(model, params, batch, step_key, distribution="normal", buffers=buffers)
            return tree_map(lambda h, e: b2 * h + (1.0 - b2) * e, state.hessian, fresh)

        due = is_due(count, update_interval)
        hessian = lazy_where(due, refresh, state.hessian)
        mu = tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)

        def direction(m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            # max, not +: a negative (Hutchinson) h must not flip the sign of the step.
            return torch.clamp(m / torch.clamp(rho * h, min=eps), -1.0, 1.0)

        new_state = ScaleBySophiaState(count=count + 1, mu=mu, hessian=hessian,
                                       refreshes=state.refreshes + due.to(count.dtype))
        return tree_map(direction, mu, hessian), new_state

    return GradientTransformation(init, update)


def sophia(model: Model, learning_rate: ScalarOrSchedule = 1e-4, *, estimator: str = "gnb", b1: float = 0.965,
           b2: float = 0.99, rho: float = 0.04, eps: float = 1e-15, weight_decay: float = 0.1,
           update_interval: int = 10, weight_decay_mask: Mask | None = None) -> GradientTransformation:
    """Sophia (Liu et al. 2023): ``θ ← θ - lr · (clip(m / max(ρ·h, ε), -1, 1) + wd · θ)``.

    A chain ``apply_if_finite(named_chain(("sophia", scale_by_sophia(...)),
    ("weight_decay", ...), ("learning_rate", ...)))`` with decoupled weight decay
    (SophiaG's ``param.mul_(1 - lr · wd)``); ``weight_decay_mask`` (a tree of bools or
    a function of the parameters) excludes leaves from it. A step whose gradient or
    update is not finite is skipped (see :func:`fprecond.transforms.apply_if_finite`).
    The update needs ``batch=`` and ``key=``. Defaults: SophiaG (module docstring).

    Example::

        from fprecond.optimizers.sophia import sophia

        opt = sophia(md, 1e-3)   # a learning rate for a small model
        state = opt.init(params)
        updates, state = opt.update(grads, state, params, batch=batch, key=fp.random.key(0))
    """
    check_number("sophia", "learning_rate", learning_rate, low=0.0, low_inclusive=False, allow_schedule=True)
    check_number("sophia", "weight_decay", weight_decay, low=0.0)
    links: list[tuple[str, GradientTransformation]] = [
        ("sophia", scale_by_sophia(model, estimator=estimator, b1=b1, b2=b2, rho=rho, eps=eps,
                                   update_interval=update_interval)),
    ]
    if weight_decay:
        links.append(("weight_decay", add_decayed_weights(weight_decay, weight_decay_mask)))
    links.append(("learning_rate", scale_by_learning_rate(learning_rate)))
    return guarded("sophia", named_chain(*links))

