"""Predictions under a Laplace posterior: Monte-Carlo over parameter samples, and
the linearised (GLM) predictive.

Monte-Carlo (:func:`predict_mc`): ``p(y | x) ≈ (1/S) Σ_s p(y | f(x, θ_s))`` with
``θ_s`` from :func:`~fprecond.laplace.sampling.sample_parameters`, the model run
once over all samples through ``torch.func.vmap`` of ``functional_call``.

Linearised (:func:`predict_glm`, Immer et al. 2021): ``f(x, θ) ≈ f(x, θ*) + J(x)(θ - θ*)``
makes the outputs Gaussian, ``f ~ N(f(x, θ*), Σ_f)`` with the functional
covariance ``Σ_f = J P⁻¹ Jᵀ`` per example (``J`` the ``(K, P)`` Jacobian of its
``K`` outputs, from ``vmap(jacrev)``; computed as ``W Wᵀ`` with ``W = J F⁻ᵀ``,
the whitened Jacobian rows of :mod:`fprecond.laplace.factor`). Then

- classification, ``link="probit"`` (MacKay 1992; Spiegelhalter & Lauritzen 1990):
  ``p ≈ softmax(f / sqrt(1 + π/8 · diag Σ_f))``;
- classification, ``link="mc"``: the mean softmax of ``S`` logit draws from
  ``N(f, Σ_f)`` (a key is needed);
- regression: ``y ~ N(f, Σ_f + σ² I)``; the diagonal is returned.

For a subset posterior (last-layer, subnetwork), ``J`` is the Jacobian w.r.t. the
subset's parameters only, the others held at their MAP values.

Shapes: inputs of ``N`` examples; outputs ``(N, C)`` or ``(N, T, C)``; ``K`` is the
number of outputs per example (``C`` or ``T·C``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import torch
from torch.func import jacrev, vmap

from fprecond import random as fprandom
from fprecond._validation import check_choice, check_positive_int
from fprecond.laplace.factor import PosteriorFactor, factorize
from fprecond.laplace.posterior import LaplacePosterior
from fprecond.laplace.sampling import sample_parameters
from fprecond.modeling import Model
from fprecond.spectral import symmetric_eigh
from fprecond.tree import tree_map

__all__ = ["Predictive", "FunctionalPosterior", "functional_covariance", "predict_glm", "predict_mc"]

Params = dict[str, torch.Tensor]


class Predictive(NamedTuple):
    """A predictive distribution, shaped like the model's outputs ``(N, C)`` or ``(N, T, C)``.

    Attributes:
        mean: classification: the predictive class probabilities (summing to 1 over
            the last dimension); regression: the predictive mean.
        variance: classification: the variance of the logits under the posterior
            (``diag Σ_f`` for the GLM, the sample variance for Monte-Carlo);
            regression: the predictive variance ``Var f + σ²``.
    """

    mean: torch.Tensor
    variance: torch.Tensor


class FunctionalPosterior(NamedTuple):
    """The linearised model's outputs: ``outputs`` at the posterior mean (``(N, C)`` or
    ``(N, T, C)``) and their covariance ``Σ_f = J P⁻¹ Jᵀ`` per example, ``(N, K, K)``."""

    outputs: torch.Tensor
    covariance: torch.Tensor


def _example_jacobians(model: Model, params: Params, subset: tuple[str, ...], inputs: Any,
                       buffers: Params | None) -> Params:
    """``{name: (N, K, *shape)}`` over ``subset``: each example's output Jacobian, by
    ``vmap(jacrev)``, the other parameters held at ``params``."""
    variables = {name: params[name] for name in subset}

    def single(example: Any) -> Params:
        def outputs(p: Params) -> torch.Tensor:
            return model.apply({**params, **p}, tree_map(lambda t: t.unsqueeze(0), example), buffers).reshape(-1)

        return jacrev(outputs)(variables)

    return vmap(single)(inputs)


def functional_covariance(model: Model, posterior: LaplacePosterior, inputs: Any, *,
                          factor: PosteriorFactor | None = None,
                          buffers: Params | None = None) -> FunctionalPosterior:
    """The outputs at the posterior mean and the functional covariance ``J P⁻¹ Jᵀ`` per example.

    Costs one Jacobian per example (``K`` backward passes, vmapped) and memory
    ``N · K · P`` (``P`` the subset's size): pass a test set in chunks when that is large.
    """
    factor = factorize(posterior) if factor is None else factor
    outputs = model.apply(posterior.mean, inputs, buffers).detach()
    jacobians = _example_jacobians(model, posterior.mean, posterior.subset, inputs, buffers)
    first = next(iter(jacobians.values()))
    n, k = first.shape[0], first.shape[1]
    rows = {name: value.reshape(n * k, *value.shape[2:]) for name, value in jacobians.items()}
    whitened = factor.whiten(rows).reshape(n, k, -1)  # (N, K, P)
    covariance = whitened @ whitened.transpose(-1, -2)
    return FunctionalPosterior(outputs, covariance)


def _output_variance(functional: FunctionalPosterior) -> torch.Tensor:
    return torch.diagonal(functional.covariance, dim1=-2, dim2=-1).reshape(functional.outputs.shape)


def predict_glm(model: Model, posterior: LaplacePosterior, inputs: Any, *, link: str = "probit",
                key: torch.Tensor | None = None, num_samples: int = 100, factor: PosteriorFactor | None = None,
                buffers: Params | None = None) -> Predictive:
    """The linearised (GLM) predictive (see the module docstring).

    Args:
        model: the model the posterior was fitted for.
        posterior: from :func:`fprecond.laplace.fit_laplace`.
        inputs: ``N`` examples.
        link: classification only: ``"probit"`` (default) or ``"mc"`` (``num_samples``
            logit draws with ``key``).
        key, num_samples: for ``link="mc"``.
        factor: a :func:`~fprecond.laplace.factorize` of the posterior to reuse.
        buffers: optional buffer values.

    Returns:
        A :class:`Predictive`.
    """
    owner = "predict_glm"
    check_choice(owner, "link", link, ("probit", "mc"))
    check_positive_int(owner, "num_samples", num_samples)
    if link == "mc" and key is None:
        raise ValueError(f"{owner}: link 'mc' draws logits and needs an explicit key (fprecond.random.key)")
    functional = functional_covariance(model, posterior, inputs, factor=factor, buffers=buffers)
    variance = _output_variance(functional)
    outputs = functional.outputs
    if posterior.likelihood == "regression":
        return Predictive(outputs, variance + posterior.sigma_noise.square())
    if link == "probit":
        return Predictive(torch.softmax(outputs / torch.sqrt(1.0 + math.pi / 8.0 * variance), dim=-1), variance)
    values, vectors = symmetric_eigh(functional.covariance)
    root = vectors * values.clamp(min=0.0).sqrt().unsqueeze(-2)  # root @ rootᵀ = Σ_f
    shape = (num_samples, *functional.covariance.shape[:-1])  # (S, N, K)
    noise = fprandom.normal(cast(torch.Tensor, key), shape, dtype=outputs.dtype).to(outputs.device)
    draws = outputs.unsqueeze(0) + (root @ noise.unsqueeze(-1)).squeeze(-1).reshape(num_samples, *outputs.shape)
    return Predictive(torch.softmax(draws, dim=-1).mean(dim=0), variance)


def predict_mc(model: Model, posterior: LaplacePosterior, inputs: Any, key: torch.Tensor, num_samples: int = 100, *,
               factor: PosteriorFactor | None = None, buffers: Params | None = None) -> Predictive:
    """The Monte-Carlo predictive over ``num_samples`` parameter samples drawn with ``key``.

    The model runs on all samples at once (``vmap`` over the stacked samples of
    :func:`~fprecond.laplace.sampling.sample_parameters`); memory grows with
    ``num_samples · N · K``. Classification averages the softmax of each sample's
    logits; regression returns the sample mean and the sample variance ``+ σ²``.
    """
    samples = sample_parameters(posterior, key, num_samples, factor=factor)
    outputs = vmap(lambda p: model.apply(p, inputs, buffers))(samples)  # (S, N, ...)
    variance = outputs.var(dim=0, correction=0)
    if posterior.likelihood == "regression":
        return Predictive(outputs.mean(dim=0), variance + posterior.sigma_noise.square())
    return Predictive(torch.softmax(outputs, dim=-1).mean(dim=0), variance)
