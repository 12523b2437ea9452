"""Regression noise in the marginal likelihood and its joint tuning with the prior precision:
against the dense formula (``torch.logdet`` of ``C/(2σ²T) + δ I`` and the Gaussian
normaliser), a grid search over ``(δ, σ)``, laplace-torch's ``log_marginal_likelihood(δ, σ)``
and its documented Adam loop on ``(log δ, log σ)``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import fprecond as fp
from fprecond.laplace import (
    curvature_spectrum,
    fit_laplace,
    log_likelihood,
    log_marginal_likelihood,
    optimize_prior_precision,
)

from tests.helpers import require_peer, stack_trees
from tests.laplace.references import dense_curvature, gaussian_normaliser, problem

SIGMA, TEMPERATURE = 0.8, 1.3


def _regression(structure: str, subset="all", n: int = 20):
    md, params, batch, batches = problem(loss="mse", n=n)
    posterior = fit_laplace(md, params, batches, structure=structure, prior_precision=0.7, sigma_noise=SIGMA,
                            temperature=TEMPERATURE, subset=subset)
    return md, params, batch, posterior


def _dense_log_marginal(curvature, squared, targets, theta, delta, sigma) -> torch.Tensor:
    """The dense formula at ``(δ, σ)`` (batched over leading dimensions of ``delta``/``sigma``):
    ``-Σ(f-y)²/(2σ²T) - M log(σ√(2π)) - ½ (log det(C/(2σ²T) + δI) - P log δ + δ |θ|²)``."""
    delta, sigma = torch.as_tensor(delta), torch.as_tensor(sigma)
    scale = 1.0 / (2.0 * sigma**2 * TEMPERATURE)
    eye = torch.eye(curvature.shape[0])
    precision = scale[..., None, None] * curvature + delta[..., None, None] * eye
    log_lik = -squared * scale - targets.numel() * torch.log(sigma * math.sqrt(2.0 * math.pi))
    size = theta.numel()
    return log_lik - 0.5 * (torch.logdet(precision) - size * torch.log(delta) + delta * theta.square().sum())


def _squared(md, params, batch) -> torch.Tensor:
    return (md.apply(params, batch[0]) - batch[1]).square().sum().detach()


@pytest.mark.parametrize("structure,subset", [("full", "all"), ("kron", "all"), ("diag", "all"),
                                              ("full", "last_layer")])
def test_log_marginal_likelihood_at_another_noise_matches_dense(structure, subset):
    # Kronecker blocks are exact for one example (no weight sharing): test them there.
    md, params, batch, posterior = _regression(structure, subset, n=1 if structure == "kron" else 20)
    names = posterior.subset
    index = torch.cat([torch.arange(start, start + params[n].numel()) for n, start in
                       zip(params, torch.cumsum(torch.tensor([0] + [v.numel() for v in params.values()]), 0).tolist())
                       if n in names])
    curvature = dense_curvature(md, params, batch, "ggn", structure)[index][:, index]
    theta = torch.cat([params[n].reshape(-1) for n in names])
    squared = _squared(md, params, batch)
    spectrum = curvature_spectrum(posterior)
    for delta, sigma in [(0.7, SIGMA), (0.3, 1.7), (4.0, 0.25)]:
        expected_lik = -squared / (2 * sigma**2 * TEMPERATURE) - gaussian_normaliser(batch[1], sigma)
        torch.testing.assert_close(log_likelihood(posterior, sigma), expected_lik, rtol=1e-12, atol=1e-12)
        expected = _dense_log_marginal(curvature, squared, batch[1], theta, delta, sigma)
        torch.testing.assert_close(log_marginal_likelihood(posterior, delta, sigma), expected, rtol=1e-11,
                                   atol=1e-11)
        # The posterior re-noised to σ gives the same value, with a spectrum computed at another σ too.
        renoised = posterior.with_sigma_noise(sigma)
        torch.testing.assert_close(log_marginal_likelihood(renoised, delta), expected, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(log_marginal_likelihood(renoised, delta, spectrum=spectrum), expected,
                                   rtol=1e-11, atol=1e-11)


def test_noise_gradient_matches_finite_differences():
    # d/dlog σ through the log-determinant too (the Kronecker eigenvalues scale with 1/σ²).
    _, _, _, posterior = _regression("kron")

    def value(logs: torch.Tensor) -> torch.Tensor:
        return log_marginal_likelihood(posterior, logs[0].exp(), logs[1].exp())

    point, step = torch.tensor([0.3, -0.2]), 1e-5
    differences = torch.stack([(value(point + step * e) - value(point - step * e)) / (2 * step)
                               for e in torch.eye(2)])
    torch.testing.assert_close(grad(value)(point), differences, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_joint_tuning_reaches_the_grid_maximum(structure):
    md, params, batch, posterior = _regression(structure)
    curvature = posterior.curvature.to_dense()  # the estimate in its structure, written densely
    theta = torch.cat([value.reshape(-1) for value in params.values()])
    squared = _squared(md, params, batch)
    deltas, sigmas = torch.logspace(-2, 2, 81), torch.logspace(-1, 1, 81)
    grid_delta, grid_sigma = torch.meshgrid(deltas, sigmas, indexing="ij")
    values = _dense_log_marginal(curvature, squared, batch[1], theta, grid_delta, grid_sigma)
    best = int(values.argmax())

    tuned = optimize_prior_precision(posterior, steps=200, tune_sigma_noise=True)
    delta, sigma = float(tuned.prior_precision), float(tuned.sigma_noise)
    assert 0.01 < delta < 100 and 0.1 < sigma < 10  # inside the grid
    reached = log_marginal_likelihood(tuned)
    assert float(reached) >= float(values.max()) - 1e-9
    # Next to the best grid point (grid spacing 12% in δ, 6% in σ).
    assert abs(delta / float(grid_delta.reshape(-1)[best]) - 1) < 0.12
    assert abs(sigma / float(grid_sigma.reshape(-1)[best]) - 1) < 0.06
    torch.testing.assert_close(reached, _dense_log_marginal(curvature, squared, batch[1], theta, delta, sigma),
                               rtol=1e-11, atol=1e-11)
    if structure == "full":  # a prior per layer is at least as good as a scalar one
        per_layer = optimize_prior_precision(posterior, prior="layer", steps=150, tune_sigma_noise=True)
        assert float(log_marginal_likelihood(per_layer)) >= float(reached) - 1e-9


def _bias_free_peer_problem():
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(20, 4, generator=g), torch.randn(20, 2, generator=g)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 2, bias=False)).double()
    return module, fp.model(module, fp.losses.mse()), inputs, targets


# laplace-torch's kron keeps biases apart: compared on a bias-free model.
@pytest.mark.parametrize("structure", ["full", "kron"])
def test_noise_marginal_likelihood_and_tuning_match_laplace_torch(structure):
    laplace_torch = require_peer("laplace")
    data = require_peer("torch.utils.data")
    module, md, inputs, targets = _bias_free_peer_problem()
    peer = laplace_torch.Laplace(copy.deepcopy(module), "regression", subset_of_weights="all",
                                 hessian_structure=structure, prior_precision=1.0, sigma_noise=1.0)
    peer.fit(data.DataLoader(data.TensorDataset(inputs, targets), batch_size=10))
    batches = [(inputs[:10], targets[:10]), (inputs[10:], targets[10:])]
    posterior = fit_laplace(md, md.params(), batches, structure=structure)
    for delta, sigma in [(1.0, 1.0), (4.0, 1.1), (0.3, 2.0), (20.0, 0.4)]:
        expected = peer.log_marginal_likelihood(torch.tensor(delta), torch.tensor(sigma)).detach()
        torch.testing.assert_close(log_marginal_likelihood(posterior, delta, sigma), expected, rtol=1e-10, atol=0.0)
    if structure == "kron":
        # laplace-torch's Kronecker log-determinant takes the σ-dependent scale as a Python number, so
        # its gradient in σ misses that term (test_noise_gradient_matches_finite_differences covers ours).
        return
    # laplace-torch's documented regression recipe: Adam (lr 0.1) on (log δ, log σ) from (1, 1).
    log_prior = torch.zeros((), requires_grad=True)
    log_sigma = torch.zeros((), requires_grad=True)
    adam = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
    for _ in range(100):
        adam.zero_grad()
        (-peer.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        adam.step()
    tuned = optimize_prior_precision(posterior, tune_sigma_noise=True)
    torch.testing.assert_close(tuned.prior_precision, log_prior.detach().exp(), rtol=1e-9, atol=0.0)
    torch.testing.assert_close(tuned.sigma_noise, log_sigma.detach().exp(), rtol=1e-9, atol=0.0)


def test_joint_tuning_of_an_ensemble_under_vmap_equals_loop():
    md, params, _, batches = problem(loss="mse")
    posteriors = [fit_laplace(md, {k: v + 0.05 * i for k, v in params.items()}, batches, structure="kron",
                              prior_precision=1.0 + i, sigma_noise=0.5 + 0.3 * i) for i in range(3)]

    def tune(posterior):
        tuned = optimize_prior_precision(posterior, prior="layer", steps=20, tune_sigma_noise=True)
        return tuned.prior_precision, tuned.sigma_noise

    looped = [torch.stack(values) for values in zip(*[tune(p) for p in posteriors])]
    batched = vmap(tune)(stack_trees(posteriors))
    for a, b in zip(batched, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_bad_noise_arguments_raise():
    md, params, _, batches = problem()
    classifier = fit_laplace(md, params, batches, structure="diag")
    with pytest.raises(ValueError, match="regression"):
        optimize_prior_precision(classifier, tune_sigma_noise=True)
    with pytest.raises(ValueError, match="sigma_noise"):
        log_marginal_likelihood(classifier, 1.0, 0.5)
    with pytest.raises(ValueError, match="sigma_noise"):
        log_likelihood(classifier, 0.5)
    _, _, _, regressor = _regression("diag")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma_noise"):
            log_marginal_likelihood(regressor, 1.0, bad)
    with pytest.raises(ValueError, match="0-dim"):
        log_marginal_likelihood(regressor, 1.0, torch.ones(2))
    with pytest.raises(ValueError, match="sigma_noise_init"):
        optimize_prior_precision(regressor, sigma_noise_init=0.5)
    with pytest.raises(TypeError, match="tune_sigma_noise"):
        optimize_prior_precision(regressor, tune_sigma_noise=1)
    with pytest.raises(ValueError, match="sigma_noise"):
        regressor.with_sigma_noise(-0.5)
