"""Stochastic estimates of a curvature diagonal from an explicit key.

Two estimators shared by the diagonal second-order methods (Sophia, AdaHessian):

* **Hutchinson** (Hutchinson 1990; Bekas, Kokiopoulou & Saad 2007): with a probe
  ``z`` of independent entries, ``E[z_i z_j] = δ_ij``, the product ``z ⊙ (H z)``
  has expectation ``diag(H)`` (``H = ∇²_θ L``, the Hessian of the loss as reduced).
  Rademacher probes (AdaHessian) give the smallest variance,
  ``Var[(z ⊙ Hz)_i] = Σ_{j≠i} H_ij²``; Gaussian probes (Sophia-H) add ``2 H_ii²``.
  Cost: one Hessian-vector product (forward-over-reverse, about two backward passes).
* **Gauss-Newton-Bartlett** (Liu et al. 2023, "Sophia", Algorithm 2): sample
  targets ``ŷ`` from the model's predictive at its outputs, take the gradient
  ``ĝ = ∇_θ L(θ; x, ŷ)`` of the batch loss on them and return ``R · ĝ ⊙ ĝ``, with
  ``R`` the loss's reduction factor (``L = (1/R) Σ ℓ``: the number of loss terms
  for ``reduction="mean"`` cross-entropy, which is the reference SophiaG's
  ``bs = batch_size · block_size``; 1 for ``"sum"``). By Bartlett's identities
  ``E_ŷ[∇ℓ ∇ℓᵀ] = Jᵀ (∂²ℓ/∂f²) J`` for each term, and cross terms vanish, so the
  expectation is ``diag(G)``, the diagonal of the GGN of ``L``. Cost: one forward
  and one backward pass.

Each function is pure, takes the key explicitly (draws come from
:mod:`fprecond.random`, never the global generator) and works under
``torch.func.vmap`` over keys and over an ensemble of parameters.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.func import grad, jvp, vjp

from fprecond import random as random_keys
from fprecond._validation import check_choice
from fprecond.modeling import Model, unpack_batch
from fprecond.tree import PyTree, tree_flatten_ordered, tree_map, tree_unflatten_ordered

__all__ = ["Distribution", "probe_vectors", "hutchinson_diagonal", "gnb_diagonal"]

Distribution = Literal["rademacher", "normal"]
Params = dict[str, torch.Tensor]


def probe_vectors(key: torch.Tensor, params: PyTree, distribution: Distribution = "rademacher") -> PyTree:
    """A random tree shaped like ``params`` with independent entries of mean 0 and variance 1.

    Leaf ``i`` (in ``named_parameters`` order) is drawn with the ``i``-th key of
    ``fprecond.random.split(key, number_of_leaves)``, in the leaf's dtype.

    Args:
        key: an ``fprecond.random`` key.
        params: the tree whose shapes and dtypes the probe takes.
        distribution: ``"rademacher"`` (±1) or ``"normal"`` (standard normal).
    """
    check_choice("probe_vectors", "distribution", distribution, ("rademacher", "normal"))
    draw = random_keys.rademacher if distribution == "rademacher" else random_keys.normal
    leaves, spec = tree_flatten_ordered(params)
    keys = random_keys.split(key, max(len(leaves), 1))
    probes = [draw(keys[index], tuple(leaf.shape), dtype=leaf.dtype) for index, leaf in enumerate(leaves)]
    return tree_unflatten_ordered(spec, probes)


def hutchinson_diagonal(model: Model, params: Params, batch: Any, key: torch.Tensor, *,
                        distribution: Distribution = "rademacher",
                        buffers: dict[str, torch.Tensor] | None = None) -> Params:
    """``z ⊙ (H z)``: an unbiased estimate of ``diag(H)``, ``H = ∇²_θ L(θ; batch)``.

    ``z = probe_vectors(key, params, distribution)``; ``H z`` by forward-over-reverse
    differentiation of the batch loss (as :func:`fprecond.func.hvp`, with ``buffers``).
    The result is shaped like ``params``; its entries may be negative (``H`` is
    indefinite away from a minimum).
    """
    check_choice("hutchinson_diagonal", "distribution", distribution, ("rademacher", "normal"))
    probe = probe_vectors(key, params, distribution)

    def gradient(p: Params) -> Params:
        return grad(model.batch_loss)(p, batch, buffers)

    hessian_probe = jvp(gradient, (params,), (probe,))[1]
    return tree_map(torch.mul, probe, hessian_probe)


def gnb_diagonal(model: Model, params: Params, batch: Any, key: torch.Tensor, *,
                 buffers: dict[str, torch.Tensor] | None = None) -> Params:
    """``R · ĝ ⊙ ĝ`` with ``ĝ = ∇_θ L(θ; x, ŷ)`` and ``ŷ = model.loss.sample_targets(f(θ; x), key)``.

    The Gauss-Newton-Bartlett estimator of Sophia (Liu et al. 2023): its expectation
    over ``ŷ`` is the diagonal of the GGN of the batch loss as reduced (see the
    module docstring). The batch's own targets are not used. One forward pass, the
    sampled targets, and one pullback of ``∂L/∂f`` at them.
    """
    inputs, targets = unpack_batch(batch)
    outputs, pullback = vjp(lambda p: model.apply(p, inputs, buffers), params)[:2]
    fixed = outputs.detach()
    model.loss.check(fixed, targets)  # unused here, but a batch that does not fit the loss is a bug upstream
    sampled = model.loss.sample_targets(fixed, key)
    (sampled_gradient,) = pullback(model.loss.output_gradient(fixed, sampled))
    factor = float(model.loss.reduction_factor(fixed))
    return tree_map(lambda g: factor * g * g, sampled_gradient)
