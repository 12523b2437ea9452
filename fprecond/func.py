"""Autodiff primitives on a :class:`~fprecond.modeling.Model`, pure ``torch.func``.

Every function here is pure (no module state is touched, no hooks), takes
``params`` as a dict ``name -> tensor`` and a ``batch = (inputs, targets)``, and
works under an outer ``torch.func.vmap`` over an ensemble of parameters.

Scaling follows the loss as reduced (see :mod:`fprecond.losses`): with
``L = (1/R) Σ_{n,t} ℓ_nt`` and ``J_nt = ∂f_nt/∂θ``,

- Hessian ``H = ∇²_θ L``;
- GGN ``G = Σ_{n,t} J_ntᵀ (∂²L/∂f_nt²) J_nt`` (``= (1/N) Σ_n J_nᵀ ∇²ℓ_n J_n`` for
  cross-entropy with ``"mean"`` and one term per example);
- exact Fisher ``F = Σ_{n,t} J_ntᵀ S_nt S_ntᵀ J_nt`` through the square root ``S``
  of the output Hessian (equal to the GGN for cross-entropy and MSE);
- empirical Fisher ``E = R Σ_n ∇_θL_n ∇_θL_nᵀ`` with ``L_n`` example ``n``'s share
  of ``L`` (``per="example"``, the default, as in ASDL), or ``R Σ_{n,t} ∇_θL_nt
  ∇_θL_ntᵀ`` over loss terms (``per="term"``, as in ``curvlinops``); the two
  differ only for sequence outputs. For one term per example and ``"mean"`` both
  are ``(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ``.

These are the conventions of ``curvlinops-for-pytorch``, against which the tests
check them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.func import grad, grad_and_value, jvp as _jvp, vjp as _vjp, vmap

from fprecond._validation import check_choice
from fprecond.modeling import Model, unpack_batch
from fprecond.tree import tree_map

__all__ = [
    "loss_and_grads",
    "per_example_grads",
    "jvp",
    "vjp",
    "hvp",
    "ggn_vp",
    "fisher_vp",
    "empirical_fisher_vp",
    "EmpiricalFisherTerms",
]

Params = dict[str, torch.Tensor]
EmpiricalFisherTerms = Literal["example", "term"]


def loss_and_grads(model: Model, params: Params, batch: Any) -> tuple[torch.Tensor, Params]:
    """The batch loss ``L`` and its gradient w.r.t. ``params`` (one forward, one backward)."""
    gradients, value = grad_and_value(model.batch_loss)(params, batch)
    return value, gradients


def per_example_grads(model: Model, params: Params, batch: Any) -> Params:
    """The gradient of each example's own loss, ``∇_θ ℓ_n`` with leading dimension ``N``.

    ``ℓ_n`` is the loss of example ``n`` alone under the loss's reduction (see
    :meth:`fprecond.losses.Loss.per_example`): the batch gradient is the mean of
    these for ``"mean"`` and their sum for ``"sum"``. Computed with
    ``vmap(grad(...))``, no loop over examples.
    """
    inputs, targets = unpack_batch(batch)

    def example_loss(p: Params, x: Any, y: torch.Tensor) -> torch.Tensor:
        one = tree_map(lambda t: t.unsqueeze(0), x)
        return model.loss(model.apply(p, one), y.unsqueeze(0))

    return vmap(grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)


def jvp(model: Model, params: Params, inputs: Any, tangents: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(θ), J v)``: the outputs and the Jacobian of the outputs w.r.t. ``params``
    applied to ``tangents`` (shaped like ``params``); ``J v`` is shaped like the outputs."""
    outputs, tangent_outputs = _jvp(lambda p: model.apply(p, inputs), (params,), (tangents,))[:2]
    return outputs, tangent_outputs


def vjp(model: Model, params: Params, inputs: Any, cotangents: torch.Tensor) -> Params:
    """``Jᵀ u``: the transposed output Jacobian applied to ``cotangents`` (shaped like the outputs)."""
    _, pullback = _vjp(lambda p: model.apply(p, inputs), params)[:2]
    return pullback(cotangents)[0]


def hvp(model: Model, params: Params, batch: Any, vector: Params) -> Params:
    """``H v`` with ``H = ∇²_θ L`` (forward-over-reverse; costs about two backward passes)."""
    def gradient(p: Params) -> Params:
        return grad(model.batch_loss)(p, batch)

    return _jvp(gradient, (params,), (vector,))[1]


def _output_space_vp(model: Model, params: Params, inputs: Any, vector: Params, middle) -> Params:
    """``Jᵀ M(f) J v`` where ``middle(outputs, Jv)`` applies the output-space matrix ``M``."""
    outputs, jv = jvp(model, params, inputs, vector)
    return vjp(model, params, inputs, middle(outputs.detach(), jv))


def ggn_vp(model: Model, params: Params, batch: Any, vector: Params) -> Params:
    """``G v`` with the generalised Gauss-Newton ``G = Jᵀ (∂²L/∂f²) J``."""
    inputs, _ = unpack_batch(batch)
    return _output_space_vp(model, params, inputs, vector, model.loss.hessian_vp)


def fisher_vp(model: Model, params: Params, batch: Any, vector: Params) -> Params:
    """``F v`` with the exact (type-2) Fisher ``F = Jᵀ S Sᵀ J``, ``S`` the output Hessian's square root."""
    inputs, _ = unpack_batch(batch)

    def through_sqrt(outputs: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
        sqrt = model.loss.hessian_sqrt(outputs)  # (..., C, K)
        return torch.einsum("...ck,...k->...c", sqrt, torch.einsum("...ck,...c->...k", sqrt, jv))

    return _output_space_vp(model, params, inputs, vector, through_sqrt)


def empirical_fisher_vp(model: Model, params: Params, batch: Any, vector: Params,
                        per: EmpiricalFisherTerms = "example") -> Params:
    """``E v`` with the empirical Fisher (uncentred gradient covariance) of the batch.

    ``E v = R Σ_n ∇L_n (∇L_nᵀ v)``: with ``r_n = ∂L/∂f_n``, ``∇L_nᵀ v = r_n · (J v)_n``,
    so one JVP and one VJP suffice and no per-example gradient is formed.

    Args:
        per: ``"example"`` (outer products of per-example gradients, the default)
            or ``"term"`` (of per-loss-term gradients, as ``curvlinops``); they
            differ only for sequence outputs.
    """
    check_choice("empirical_fisher_vp", "per", per, ("example", "term"))
    inputs, targets = unpack_batch(batch)

    def through_gradients(outputs: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
        residual = grad(lambda f: model.loss(f, targets))(outputs)  # ∂L/∂f, carries 1/R
        products = residual * jv
        if per == "example":
            coefficient = products.reshape(products.shape[0], -1).sum(dim=1)
            coefficient = coefficient.reshape(-1, *([1] * (products.dim() - 1)))
        else:
            coefficient = products.sum(dim=-1, keepdim=True)
        return model.loss.reduction_factor(outputs) * coefficient * residual

    return _output_space_vp(model, params, inputs, vector, through_gradients)

