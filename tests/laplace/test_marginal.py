"""The Laplace log marginal likelihood against the dense formula with ``torch.logdet``,
and prior-precision tuning against a grid search of the dense formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

import fprecond as fp
from fprecond.laplace import (
    curvature_spectrum,
    factorize,
    fit_laplace,
    log_likelihood,
    log_marginal_likelihood,
    optimize_prior_precision,
    posterior_precision,
    sample_parameters,
)

from tests.helpers import stack_trees
from tests.laplace.references import dense_log_marginal, gaussian_normaliser, prior_diagonal, problem

PER_LAYER = {"0": 0.5, "2": 2.0}


def _dense_log_marginal(posterior, params, log_lik, prior) -> torch.Tensor:
    return dense_log_marginal(log_lik, posterior_precision(posterior).to_dense(), prior, params)


@pytest.mark.parametrize("structure", ["full", "layer", "kron", "unit", "diag"])
def test_classification_log_marginal_likelihood_matches_dense(structure):
    md, params, batch, batches = problem()
    posterior = fit_laplace(md, params, batches, structure=structure, prior_precision=torch.tensor([0.5, 2.0]),
                            temperature=0.8)
    log_lik = -F.cross_entropy(md.apply(params, batch[0]), batch[1], reduction="sum").detach() / 0.8
    torch.testing.assert_close(log_likelihood(posterior), log_lik, rtol=1e-12, atol=0.0)
    expected = _dense_log_marginal(posterior, params, log_lik, prior_diagonal(params, PER_LAYER))
    torch.testing.assert_close(log_marginal_likelihood(posterior), expected, rtol=1e-11, atol=1e-11)
    # The factors' log-determinant (Kronecker: from the factors' eigenvalues) is the dense one.
    precision = posterior_precision(posterior).to_dense()
    torch.testing.assert_close(factorize(posterior).logdet(), torch.logdet(precision), rtol=1e-11, atol=1e-11)
    # A scalar override.
    override = posterior_precision(posterior, torch.tensor(3.0)).to_dense()
    scalar = dense_log_marginal(log_lik, override, prior_diagonal(params, 3.0), params)
    torch.testing.assert_close(log_marginal_likelihood(posterior, 3.0), scalar, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_regression_log_marginal_likelihood_matches_dense(structure):
    md, params, batch, batches = problem(loss="mse")
    sigma, temperature = 0.8, 1.3
    posterior = fit_laplace(md, params, batches, structure=structure, prior_precision=0.7, sigma_noise=sigma,
                            temperature=temperature)
    squared = (md.apply(params, batch[0]) - batch[1]).square().sum().detach()
    log_lik = -squared / (2 * sigma**2 * temperature) - gaussian_normaliser(batch[1], sigma)
    torch.testing.assert_close(log_likelihood(posterior), log_lik, rtol=1e-12, atol=1e-12)
    expected = _dense_log_marginal(posterior, params, log_lik, prior_diagonal(params, 0.7))
    torch.testing.assert_close(log_marginal_likelihood(posterior), expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_scalar_tuning_reaches_the_grid_maximum(structure):
    md, params, batch, batches = problem()
    posterior = fit_laplace(md, params, batches, structure=structure)
    grid = torch.logspace(-2, 2, 801)
    values = vmap(lambda delta: log_marginal_likelihood(posterior, delta))(grid)
    tuned = optimize_prior_precision(posterior, steps=300)
    assert tuned.prior_precision.dim() == 0
    assert 0.01 < float(tuned.prior_precision) < 100  # inside the grid
    # At least as good as the best grid point, and next to it (grid spacing 1.2%).
    assert float(log_marginal_likelihood(tuned)) >= float(values.max()) - 1e-9
    best = grid[values.argmax()]
    assert abs(float(tuned.prior_precision) / float(best) - 1) < 0.02
    # The dense formula agrees at the tuned value.
    log_lik = log_likelihood(posterior)
    dense = _dense_log_marginal(tuned, params, log_lik, prior_diagonal(params, float(tuned.prior_precision)))
    torch.testing.assert_close(log_marginal_likelihood(tuned), dense, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_per_layer_tuning_reaches_the_grid_maximum(structure):
    md, params, batch, batches = problem()
    posterior = fit_laplace(md, params, batches, structure=structure)
    tuned = optimize_prior_precision(posterior, prior="layer", steps=300)
    assert tuned.prior_precision.shape == (2,)
    grid = torch.logspace(-2, 2, 41)
    first, second = torch.meshgrid(grid, grid, indexing="ij")
    pairs = torch.stack([first.reshape(-1), second.reshape(-1)], dim=1)
    values = vmap(lambda delta: log_marginal_likelihood(posterior, delta))(pairs)
    assert float(log_marginal_likelihood(tuned)) >= float(values.max()) - 1e-9
    # Per-layer tuning is at least as good as the scalar one.
    scalar = optimize_prior_precision(posterior, steps=300)
    assert float(log_marginal_likelihood(tuned)) >= float(log_marginal_likelihood(scalar)) - 1e-9


def test_tuning_an_ensemble_under_vmap_equals_loop():
    md, params, _, batches = problem()
    posteriors = [fit_laplace(md, {k: v + 0.05 * i for k, v in params.items()}, batches, structure="kron",
                              prior_precision=1.0 + i) for i in range(3)]
    looped = torch.stack([optimize_prior_precision(p, prior="layer", steps=20).prior_precision for p in posteriors])
    batched = vmap(lambda p: optimize_prior_precision(p, prior="layer", steps=20).prior_precision)(
        stack_trees(posteriors))
    torch.testing.assert_close(batched, looped, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("structure", ["full", "layer", "unit", "kron", "diag"])
def test_indefinite_hessian_is_projected_not_nan(structure):
    # Away from a minimum the Hessian has negative eigenvalues; its likelihood curvature is
    # projected onto the PSD cone before the prior is added, so every result stays finite.
    md, params, batch, batches = problem()
    delta = 1e-3
    posterior = fit_laplace(md, params, batches, kind="hessian", structure=structure, prior_precision=delta)
    curvature = posterior.curvature.to_dense()
    if structure in ("full", "layer", "unit", "diag"):
        values = torch.linalg.eigvalsh(curvature)
        assert float(values.min()) < -10 * delta  # the test case really is indefinite
        expected = torch.log(values.clamp(min=0.0) + delta).sum()
        torch.testing.assert_close(factorize(posterior).logdet(), expected, rtol=1e-9, atol=1e-9)
    samples = sample_parameters(posterior, fp.random.key(0), 8)
    assert all(bool(torch.isfinite(value).all()) for value in samples.values())
    assert bool(torch.isfinite(log_marginal_likelihood(posterior)))
    assert bool(torch.isfinite(optimize_prior_precision(posterior, steps=10).prior_precision))


def test_bad_arguments_raise():
    md, params, _, batches = problem()
    posterior = fit_laplace(md, params, batches, structure="diag")
    with pytest.raises(ValueError, match="prior"):
        optimize_prior_precision(posterior, prior="diag")
    with pytest.raises(ValueError, match="steps"):
        optimize_prior_precision(posterior, steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        optimize_prior_precision(posterior, learning_rate=-1.0)
    with pytest.raises(ValueError, match="prior_precision"):
        log_marginal_likelihood(posterior, -1.0)


def test_prior_shape_and_spectrum_mismatch_raise():
    md, params, _, batches = problem()
    posterior = fit_laplace(md, params, batches, structure="full")
    with pytest.raises(ValueError, match="one value per prior group"):
        log_marginal_likelihood(posterior, torch.ones(3))
    scalar_spectrum = curvature_spectrum(posterior, per_layer=False)
    with pytest.raises(ValueError, match="spectrum"):
        log_marginal_likelihood(posterior, torch.ones(2), spectrum=scalar_spectrum)
    # A matching spectrum gives the value computed from scratch.
    layer_spectrum = curvature_spectrum(posterior, per_layer=True)
    delta = torch.tensor([0.3, 4.0])
    torch.testing.assert_close(log_marginal_likelihood(posterior, delta, spectrum=layer_spectrum),
                               log_marginal_likelihood(posterior, delta), rtol=1e-12, atol=1e-12)
