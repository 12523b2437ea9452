"""AdaHessian: Adam with the Hessian diagonal in place of the squared gradient
(Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney 2021, "ADAHESSIAN: An Adaptive
Second Order Optimizer for Machine Learning", AAAI).

With a Hutchinson estimate ``D = |z ⊙ (H z)|`` (``z`` Rademacher, ``H = ∇²_θ L`` of
the batch; :func:`fprecond.curvature.hutchinson.hutchinson_diagonal`), spatially
averaged over each convolution kernel, every step

    ``m ← β₁ m + (1-β₁) g``,  ``v ← β₂ v + (1-β₂) D ⊙ D``,
    ``u = m̂ / (v̂^{k/2} + ε)``  with ``m̂ = m / (1-β₁ᵗ)``, ``v̂ = v / (1-β₂ᵗ)``,
    ``θ ← θ - lr · (u + wd · θ)``,

``k`` the Hessian power. Details follow the reference (``amirgholami/adahessian``,
``image_classification/optim_adahessian.py``):

* ``D`` is the absolute value ``|z ⊙ Hz| = |Hz|`` (only ``D²`` enters for tensors of
  up to two dimensions, so the sign does not matter there).
* **Spatial averaging**: for a convolution kernel ``(O, C, k_h, k_w)`` the reference
  replaces ``D`` by its mean over the spatial dimensions ``[2, 3]`` (``keepdim``),
  i.e. one value per (output, input) channel pair, broadcast over the kernel.
  Here every leaf with ``ndim >= 3`` is averaged over dimensions ``2..`` (so a
  ``Conv1d`` kernel ``(O, C, k)`` too, which the reference does not handle).
* Defaults ``lr = 0.15``, ``β = (0.9, 0.999)``, ``ε = 1e-4``, ``wd = 0``, ``k = 1``
  are the reference's; its weight decay is decoupled, ``θ - lr · (u + wd · θ)``.
* ``update_each`` (from ``davda54/ada-hessian``): ``D`` is re-estimated on steps
  ``0, n, 2n, ...`` and the stored ``D`` is reused in between, while ``v`` is still
  averaged every step, as there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fprecond import random as random_keys
from fprecond._validation import check_number, check_positive_int, step_counter
from fprecond.base import (
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Updates,
    named_chain,
    require_extras,
    require_params,
)
from fprecond.curvature.hutchinson import hutchinson_diagonal
from fprecond.lazy import lazy_where
from fprecond.modeling import Model
from fprecond.optimizers._recipe import guarded
from fprecond.precondition import is_due
from fprecond.transforms import add_decayed_weights, scale_by_learning_rate
from fprecond.transforms.adam import bias_correction
from fprecond.tree import PyTree, tree_map, tree_zeros_like

__all__ = ["scale_by_adahessian", "adahessian", "ScaleByAdaHessianState", "spatial_average"]


class ScaleByAdaHessianState(NamedTuple):
    """AdaHessian's state (tensor leaves shaped like the parameters, 0-dim int64 counters).

    Attributes:
        count: steps taken.
        mu: the gradient's running average ``m``.
        nu: the running average ``v`` of ``D ⊙ D``.
        diagonal: the last Hutchinson estimate ``D`` (reused between refreshes).
        refreshes: number of Hutchinson estimates taken so far.
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count
    mu: PyTree
    nu: PyTree
    diagonal: PyTree
    refreshes: torch.Tensor


def spatial_average(diagonal: torch.Tensor) -> torch.Tensor:
    """``|D|`` averaged over the spatial dimensions ``2..`` of a kernel ``(O, C, *spatial)``,
    broadcast back to its shape; ``|D|`` for tensors of up to two dimensions."""
    magnitude = diagonal.abs()
    if diagonal.ndim < 3:
        return magnitude
    spatial = tuple(range(2, diagonal.ndim))
    return magnitude.mean(dim=spatial, keepdim=True).expand_as(magnitude)


def scale_by_adahessian(model: Model, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-4,
                        hessian_power: float = 1.0, update_each: int = 1,
                        spatial_averaging: bool = True) -> GradientTransformation:
    """AdaHessian's direction ``m̂ / (v̂^{k/2} + ε)`` (see the module docstring).

    Args:
        model: the model and loss whose Hessian diagonal is estimated.
        b1: decay of the gradient average.
        b2: decay of the average of ``D²``.
        eps: added to the denominator.
        hessian_power: ``k`` in ``[0, 1]`` (``0``: momentum SGD; ``1``: AdaHessian).
        update_each: estimate ``D`` every this many steps, reuse it in between.
        spatial_averaging: average ``|D|`` over the spatial dimensions of kernels
            with ``ndim >= 3``.

    ``update(grads, state, params, batch=(inputs, targets), key=..., buffers=None)``:
    ``batch`` and ``key`` are required; the Rademacher probe is drawn from
    ``fprecond.random.fold_in(key, count)``.
    """
    owner = "scale_by_adahessian"
    if not isinstance(model, Model):
        raise TypeError(f"{owner}: model must be an fprecond Model (fprecond.model(module, loss)), "
                        f"got {type(model).__name__}")
    check_number(owner, "b1", b1, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "b2", b2, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "eps", eps, low=0.0, low_inclusive=False)
    check_number(owner, "hessian_power", hessian_power, low=0.0, high=1.0)
    check_positive_int(owner, "update_each", update_each)
    power = 0.5 * hessian_power

    def init(params: Params) -> ScaleByAdaHessianState:
        count = step_counter(owner, params)
        return ScaleByAdaHessianState(count=count, mu=tree_zeros_like(params), nu=tree_zeros_like(params),
                                      diagonal=tree_zeros_like(params), refreshes=torch.zeros_like(count))

    @require_extras(owner, "batch", "key")
    def update(updates: Updates, state: ScaleByAdaHessianState, params: Params | None = None, **extra: Any):
        params = require_params(owner, params)
        batch, key, buffers = extra["batch"], extra["key"], extra.get("buffers")
        count = state.count

        def estimate() -> PyTree:
            fresh = hutchinson_diagonal(model, params, batch, random_keys.fold_in(key, count),
                                        distribution="rademacher", buffers=buffers)
            return tree_map(spatial_average if spatial_averaging else torch.abs, fresh)

        due = is_due(count, update_each)
        diagonal = lazy_where(due, estimate, state.diagonal)
        step = count + 1
        mu = tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = tree_map(lambda v, d: b2 * v + (1.0 - b2) * d * d, state.nu, diagonal)

        def direction(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            m_hat = m / bias_correction(b1, step, m)
            v_hat = v / bias_correction(b2, step, v)
            return m_hat / (v_hat.pow(power) + eps)

        new_state = ScaleByAdaHessianState(count=step, mu=mu, nu=nu, diagonal=diagonal,
                                           refreshes=state.refreshes + due.to(count.dtype))
        return tree_map(direction, mu, nu), new_state

    return GradientTransformation(init, update)


def adahessian(model: Model, learning_rate: ScalarOrSchedule = 0.15, *, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-4, weight_decay: float = 0.0, hessian_power: float = 1.0, update_each: int = 1,
               spatial_averaging: bool = True) -> GradientTransformation:
    """AdaHessian (Yao et al. 2021): ``θ ← θ - lr · (m̂ / (v̂^{k/2} + ε) + wd · θ)``.

    A chain ``apply_if_finite(named_chain(("adahessian", scale_by_adahessian(...)),
    ("weight_decay", ...), ("learning_rate", ...)))``; a step whose gradient or update
    is not finite is skipped. The update needs ``batch=`` and ``key=``. Defaults: the
    reference implementation (module docstring).

    Example::

        from fprecond.optimizers.adahessian import adahessian

        opt = adahessian(md)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params, batch=batch, key=fp.random.key(0))
    """
    check_number("adahessian", "learning_rate", learning_rate, low=0.0, low_inclusive=False, allow_schedule=True)
    check_number("adahessian", "weight_decay", weight_decay, low=0.0)
    links: list[tuple[str, GradientTransformation]] = [
        ("adahessian", scale_by_adahessian(model, b1=b1, b2=b2, eps=eps, hessian_power=hessian_power,
                                           update_each=update_each, spatial_averaging=spatial_averaging)),
    ]
    if weight_decay:
        links.append(("weight_decay", add_decayed_weights(weight_decay)))
    links.append(("learning_rate", scale_by_learning_rate(learning_rate)))
    return guarded("adahessian", named_chain(*links))
