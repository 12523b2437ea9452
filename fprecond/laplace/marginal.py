"""The Laplace approximation to the log marginal likelihood, and prior-precision and
noise tuning.

With ``θ*`` the posterior mean, ``P₀`` the prior precision and ``P = s · C + P₀``
(MacKay 1992; Immer et al. 2021):

    ``log p(D) ≈ log p(D | θ*) - ½ (log det P - log det P₀ + θ*ᵀ P₀ θ*)``

with ``log p(D | θ*) = -Σ_n ℓ_n / T`` for classification and, for regression with
the squared error ``ℓ_n = Σ_c (f_nc - y_nc)²`` and a Gaussian likelihood ``N(y | f, σ²)``,

    ``log p(D | θ*) = -Σ_n ℓ_n / (2σ²T) - M log(σ √(2π))``,  ``s = 1/(2σ²T)``

(``M`` scalar targets; the temperature divides the data term, not the
normaliser), as laplace-torch. For a subset posterior (last-layer, subnetwork)
``P``, ``P₀`` and ``θ*`` are the subset's: the prior term covers the subset
only, as laplace-torch's last-layer and subnetwork Laplace. The
log-determinants come from the factors: for a Kronecker block
``Σ_ij log(s λ^G_i λ^A_j + δ)`` (exact, from the factors' eigenvalues), for dense,
unit-wise and diagonal blocks their eigenvalues or diagonal. Negative
eigenvalues of ``s · C`` are clamped at zero (see :mod:`fprecond.laplace.factor`).

The spectra are computed once (:func:`curvature_spectrum`), after which the
marginal likelihood is a cheap, differentiable function of ``δ`` and ``σ``: a
new noise ``σ'`` rescales the spectrum of ``s · C`` by ``s'/s = σ²/σ'²`` (the
PSD projection commutes with a positive scale), so one spectrum serves every
``σ``. That is what
:func:`optimize_prior_precision` ascends, in ``log δ`` (and ``log σ`` with
``tune_sigma_noise``), with Adam for a fixed number of steps (deterministic,
vmappable over an ensemble of posteriors). A dense ``full`` block with a
per-layer prior has no shared eigenbasis; its log-determinant is a Cholesky
factorisation of ``s·C₊ + P₀`` at every step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.func import grad

from fprecond._validation import check_choice, check_number, check_positive_int
from fprecond.base import apply_updates, chain
from fprecond.curvature.blocks import DenseBlock, DiagonalBlock, KroneckerBlock, UnitBlock
from fprecond.laplace.posterior import LaplacePosterior, sigma_noise_tensor
from fprecond.spectral import symmetric_eigh
from fprecond.transforms.adam import scale_by_adam
from fprecond.transforms.scaling import scale_by_learning_rate
from fprecond.tree import pytree_dataclass, static_field

__all__ = ["CurvatureSpectrum", "curvature_spectrum", "log_likelihood", "log_marginal_likelihood",
           "optimize_prior_precision"]

Params = dict[str, torch.Tensor]


@pytree_dataclass
class CurvatureSpectrum:
    """What the log-determinant of ``s · C + P₀`` needs, per curvature block.

    ``values[b]`` holds the clamped eigenvalues of ``s · C_b`` (any shape) when the
    block has one prior precision (``names[b][0]``'s), or, for a ``full`` block
    under a per-layer prior (``dense[b]`` True), the PSD-projected ``(P_b, P_b)``
    matrix ``s · C₊``. ``scale``: the likelihood scale ``s`` it was computed with (0-dim);
    used with another ``s'`` (another noise ``σ``), the values are rescaled by ``s'/s``.
    ``per_layer``: the prior structure it was built for.
    """

    values: tuple[torch.Tensor, ...]
    scale: torch.Tensor
    names: tuple[tuple[str, ...], ...] = static_field()
    shapes: tuple[tuple[tuple[int, ...], ...], ...] = static_field()
    dense: tuple[bool, ...] = static_field()
    per_layer: bool = static_field(default=False)


def _clamped_eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    return symmetric_eigh(matrix)[0].clamp(min=0.0)


def curvature_spectrum(posterior: LaplacePosterior, per_layer: bool | None = None) -> CurvatureSpectrum:
    """The eigenvalues of the scaled likelihood curvature ``s · C``, block by block.

    ``per_layer``: whether the prior precision it will be used with has one value per
    prior group (default: as the posterior's). Pure and vmappable.
    """
    if per_layer is None:
        per_layer = posterior.prior_precision.dim() == 1
    group_of = {name: index for index, (_, names) in enumerate(posterior.groups) for name in names}
    scale = posterior.likelihood_scale
    values: list[torch.Tensor] = []
    dense: list[bool] = []
    for block in posterior.curvature.blocks:
        one_prior = not per_layer or len({group_of[name] for name in block.names}) == 1
        if isinstance(block, KroneckerBlock):
            eig_a = symmetric_eigh(block.input_factor)[0]
            eig_g = symmetric_eigh(block.output_factor)[0]
            products = scale * (eig_g[:, :, None] * eig_a[:, None, :] + block.damping)
            values.append(products.clamp(min=0.0))
        elif isinstance(block, DiagonalBlock):
            values.append(torch.cat([(scale * block.diagonal[name]).reshape(-1) for name in block.names])
                          .clamp(min=0.0))
        elif isinstance(block, UnitBlock):
            values.append(_clamped_eigenvalues(scale * block.blocks))
        elif isinstance(block, DenseBlock) and one_prior:
            values.append(_clamped_eigenvalues(scale * block.matrix))
        elif isinstance(block, DenseBlock):
            eigenvalues, vectors = symmetric_eigh(scale * block.matrix)
            values.append((vectors * eigenvalues.clamp(min=0.0).unsqueeze(-2)) @ vectors.transpose(-1, -2))
        else:
            raise TypeError(f"laplace: no log-determinant for a {type(block).__name__}")
        dense.append(isinstance(block, DenseBlock) and not one_prior)
    names = tuple(block.names for block in posterior.curvature.blocks)
    shapes = tuple(tuple(block.shapes) for block in posterior.curvature.blocks)
    return CurvatureSpectrum(tuple(values), scale, names, shapes, tuple(dense), per_layer)


def _posterior_logdet(spectrum: CurvatureSpectrum, prior: Params, scale: torch.Tensor) -> torch.Tensor:
    """``log det(s' · C₊ + P₀)`` for the likelihood scale ``s' = scale``."""
    # s'/s is exactly 1 (and the values unchanged, bit for bit) when s' is the spectrum's own s.
    ratio = scale / spectrum.scale
    terms = []
    for values, names, shapes, dense in zip(spectrum.values, spectrum.names, spectrum.shapes, spectrum.dense):
        values = ratio * values
        if dense:
            diagonal = torch.cat([prior[name] * values.new_ones(math.prod(shape))
                                  for name, shape in zip(names, shapes)])
            lower = torch.linalg.cholesky_ex(values + torch.diag_embed(diagonal))[0]
            terms.append(2.0 * torch.log(torch.diagonal(lower)).sum())
        else:
            terms.append(torch.log(values + prior[names[0]]).sum())
    return torch.stack(terms).sum()


def log_likelihood(posterior: LaplacePosterior, sigma_noise: float | torch.Tensor | None = None) -> torch.Tensor:
    """``log p(D | θ*)`` of the training data at the posterior mean (0-dim; see the module docstring).

    ``sigma_noise`` (regression only) overrides the posterior's ``σ``; differentiable in it."""
    sigma = posterior.sigma_noise if sigma_noise is None else \
        sigma_noise_tensor(sigma_noise, posterior.likelihood, posterior.sigma_noise, "log_likelihood")
    value = -posterior.loss / posterior.temperature
    if posterior.likelihood == "regression":
        value = -posterior.loss / (2.0 * sigma.square() * posterior.temperature)
        value = value - posterior.n_targets.to(value.dtype) * torch.log(sigma * math.sqrt(2.0 * math.pi))
    return value


def _prior_terms(posterior: LaplacePosterior, prior: Params) -> torch.Tensor:
    """``log det P₀ - θ*ᵀ P₀ θ*`` summed over the subset's parameters (in ``mean``'s order)."""
    terms = [value.numel() * torch.log(prior[name]) - prior[name] * value.square().sum()
             for name, value in posterior.mean.items() if name in prior]
    return torch.stack(terms).sum()


def log_marginal_likelihood(posterior: LaplacePosterior, prior_precision: torch.Tensor | float | None = None,
                            sigma_noise: torch.Tensor | float | None = None, *,
                            spectrum: CurvatureSpectrum | None = None) -> torch.Tensor:
    """The Laplace log marginal likelihood (0-dim), differentiable in ``prior_precision``
    and ``sigma_noise`` (laplace-torch's ``log_marginal_likelihood(prior_precision, sigma_noise)``).

    Args:
        posterior: from :func:`fprecond.laplace.fit_laplace`.
        prior_precision: overrides the posterior's ``δ`` (0-dim or one per prior group).
        sigma_noise: regression only: overrides the posterior's noise ``σ`` (a positive
            number or a 0-dim tensor); the likelihood scale ``s = 1/(2σ²T)`` of the
            precision and the Gaussian normaliser ``M log(σ √(2π))`` follow it.
        spectrum: :func:`curvature_spectrum` of the posterior, to reuse across calls
            (it must match the prior's structure: scalar or per layer; computed at
            one ``σ``, it is rescaled for another).
    """
    if prior_precision is None:
        delta = posterior.prior_precision
    elif isinstance(prior_precision, torch.Tensor):
        delta = prior_precision
    else:
        delta = posterior.with_prior_precision(prior_precision).prior_precision
    groups = len(posterior.groups)
    if delta.dim() > 1 or (delta.dim() == 1 and delta.shape[0] != groups):
        raise ValueError(f"log_marginal_likelihood: prior_precision must be 0-dim or have one value per prior group "
                         f"({groups}), got shape {tuple(delta.shape)}")
    if spectrum is None:
        spectrum = curvature_spectrum(posterior, per_layer=delta.dim() == 1)
    elif spectrum.per_layer != (delta.dim() == 1):
        raise ValueError("log_marginal_likelihood: the spectrum was computed for a "
                         f"{'per-layer' if spectrum.per_layer else 'scalar'} prior; pass a matching prior_precision "
                         "or recompute it with curvature_spectrum(posterior, per_layer=...)")
    prior = posterior.prior_per_parameter(delta)
    scale = posterior.likelihood_scale
    if sigma_noise is not None:
        sigma = sigma_noise_tensor(sigma_noise, posterior.likelihood, posterior.sigma_noise, "log_marginal_likelihood")
        scale = dataclasses.replace(posterior, sigma_noise=sigma).likelihood_scale
    return log_likelihood(posterior, sigma_noise) - 0.5 * (_posterior_logdet(spectrum, prior, scale)
                                                           - _prior_terms(posterior, prior))


def optimize_prior_precision(posterior: LaplacePosterior, *, prior: str = "scalar", steps: int = 100,
                             learning_rate: float = 0.1, init: float | torch.Tensor | None = None,
                             tune_sigma_noise: bool = False,
                             sigma_noise_init: float | torch.Tensor | None = None) -> LaplacePosterior:
    """Tune the prior precision (and, for regression, the noise) by maximising the log
    marginal likelihood (MacKay 1992; Immer et al. 2021), with Adam on ``log δ`` (and
    ``log σ``) for a fixed number of steps (laplace-torch's defaults: 100 steps, learning
    rate 0.1; its regression example tunes ``log σ`` jointly the same way).

    Args:
        posterior: from :func:`fprecond.laplace.fit_laplace`.
        prior: ``"scalar"`` (one ``δ``) or ``"layer"`` (one per prior group).
        steps: Adam steps.
        learning_rate: Adam's learning rate on ``log δ`` and ``log σ``.
        init: the starting ``δ`` (default: the posterior's, averaged for ``"scalar"``).
        tune_sigma_noise: regression only: also tune the noise ``σ``, jointly with ``δ``
            (the likelihood scale ``1/(2σ²T)`` and the normaliser change with it; the
            mean ``θ*`` stays).
        sigma_noise_init: the starting ``σ`` (default: the posterior's).

    Returns:
        The posterior with the tuned prior precision (0-dim or ``(L,)``) and, with
        ``tune_sigma_noise``, the tuned ``sigma_noise``.
    """
    owner = "optimize_prior_precision"
    check_choice(owner, "prior", prior, ("scalar", "layer"))
    check_positive_int(owner, "steps", steps)
    check_number(owner, "learning_rate", learning_rate, low=0.0, low_inclusive=False)
    if not isinstance(tune_sigma_noise, bool):
        raise TypeError(f"{owner}: tune_sigma_noise must be a bool, got {type(tune_sigma_noise).__name__}")
    if tune_sigma_noise and posterior.likelihood != "regression":
        raise ValueError(f"{owner}: tune_sigma_noise needs a regression posterior; classification has no noise "
                         "to tune")
    if sigma_noise_init is not None and not tune_sigma_noise:
        raise ValueError(f"{owner}: sigma_noise_init is the starting noise of tune_sigma_noise=True")
    sigma_start = posterior.sigma_noise if sigma_noise_init is None else \
        sigma_noise_tensor(sigma_noise_init, posterior.likelihood, posterior.sigma_noise, owner)
    start = posterior.prior_precision if init is None else posterior.with_prior_precision(init).prior_precision
    groups = len(posterior.groups)
    if prior == "scalar":
        start = start.mean() if start.dim() == 1 else start
    else:
        start = start.expand(groups) if start.dim() == 0 else start
    spectrum = curvature_spectrum(posterior, per_layer=prior == "layer")

    def negative(logs: Params) -> torch.Tensor:
        sigma = torch.exp(logs["log_sigma"]) if tune_sigma_noise else None
        return -log_marginal_likelihood(posterior, torch.exp(logs["log_prior"]), sigma, spectrum=spectrum)

    optimizer = chain(scale_by_adam(), scale_by_learning_rate(learning_rate))
    params = {"log_prior": torch.log(start)}
    if tune_sigma_noise:
        params["log_sigma"] = torch.log(sigma_start)
    state = optimizer.init(params)
    gradient = grad(negative)
    for _ in range(steps):
        updates, state = optimizer.update(gradient(params), state, params)
        params = apply_updates(params, updates)
    # exp of the (finite) iterates is positive; no check here, which would read values inside vmap.
    tuned = dataclasses.replace(posterior, prior_precision=torch.exp(params["log_prior"]).detach())
    if tune_sigma_noise:
        tuned = dataclasses.replace(tuned, sigma_noise=torch.exp(params["log_sigma"]).detach())
    return tuned
