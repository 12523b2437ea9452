"""The GLM predictive against a dense ``J P⁻¹ Jᵀ`` (autograd Jacobians, ``torch.linalg.inv``),
the probit and Gaussian predictives written out, and the Monte-Carlo predictive
against a loop over samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond.laplace import (
    fit_laplace,
    functional_covariance,
    posterior_precision,
    predict_glm,
    predict_mc,
    sample_parameters,
)
from fprecond.tree import tree_leaves

from tests.helpers import assert_relative_close, dense_jacobian, make_problem, stack_trees
from tests.laplace.references import problem

TOL = 1e-10


def _dense_functional_covariance(md, posterior, inputs) -> torch.Tensor:
    """``(N, K, K)`` blocks of ``J P⁻¹ Jᵀ`` from the dense Jacobian and the inverse precision."""
    jacobian = dense_jacobian(md, posterior.mean, inputs)  # (N·K, P)
    covariance = jacobian @ torch.linalg.inv(posterior_precision(posterior).to_dense()) @ jacobian.T
    n = inputs.shape[0]
    k = jacobian.shape[0] // n
    return torch.stack([covariance[i * k:(i + 1) * k, i * k:(i + 1) * k] for i in range(n)])


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_functional_covariance_matches_dense(structure):
    md, params, _, batches = problem()
    posterior = fit_laplace(md, params, batches, structure=structure, prior_precision=torch.tensor([0.5, 2.0]))
    inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(9))
    functional = functional_covariance(md, posterior, inputs)
    assert_relative_close(functional.covariance, _dense_functional_covariance(md, posterior, inputs), TOL)
    assert_relative_close(functional.outputs, md.apply(params, inputs), TOL)


@pytest.mark.parametrize("case_name", ["cnn", "embedding"])
def test_functional_covariance_for_conv_embedding_and_norm_layers(case_name):
    md, params, batch = make_problem(case_name, ("cross_entropy", "mean"), n=4)
    posterior = fit_laplace(md, params, [batch], structure="kron", prior_precision=0.8)
    inputs = batch[0][:2]
    functional = functional_covariance(md, posterior, inputs)
    assert_relative_close(functional.covariance, _dense_functional_covariance(md, posterior, inputs), TOL)


def test_functional_covariance_of_sequence_outputs():
    md, params, batch = make_problem("sequence", ("cross_entropy", "mean"), n=6)
    posterior = fit_laplace(md, params, [batch], structure="layer", prior_precision=1.5)
    inputs = batch[0][:3]
    functional = functional_covariance(md, posterior, inputs)
    assert functional.covariance.shape == (3, 15, 15)
    assert_relative_close(functional.covariance, _dense_functional_covariance(md, posterior, inputs), TOL)
    probabilities = predict_glm(md, posterior, inputs).mean
    assert probabilities.shape == (3, 5, 3)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3, 5))


def test_probit_predictive():
    md, params, _, batches = problem()
    posterior = fit_laplace(md, params, batches, structure="kron", prior_precision=0.3)
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    variance = torch.diagonal(_dense_functional_covariance(md, posterior, inputs), dim1=-2, dim2=-1)
    expected = torch.softmax(md.apply(params, inputs) / torch.sqrt(1 + math.pi / 8 * variance), dim=-1)
    predictive = predict_glm(md, posterior, inputs)
    assert_relative_close(predictive.mean, expected, TOL)
    assert_relative_close(predictive.variance, variance, TOL)


def test_gaussian_predictive_for_regression():
    md, params, _, batches = problem(loss="mse")
    posterior = fit_laplace(md, params, batches, structure="full", prior_precision=0.7, sigma_noise=0.4)
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    variance = torch.diagonal(_dense_functional_covariance(md, posterior, inputs), dim1=-2, dim2=-1)
    predictive = predict_glm(md, posterior, inputs)
    assert_relative_close(predictive.mean, md.apply(params, inputs), TOL)
    assert_relative_close(predictive.variance, variance + 0.4**2, TOL)


def test_sampled_link_approaches_the_expected_softmax():
    md, params, _, batches = problem()
    posterior = fit_laplace(md, params, batches, structure="full", prior_precision=0.3)
    inputs = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    covariance = _dense_functional_covariance(md, posterior, inputs)
    lower = torch.linalg.cholesky(covariance + 1e-12 * torch.eye(3))
    noise = torch.randn(200_000, 4, 3, 1, generator=torch.Generator().manual_seed(0))
    draws = md.apply(params, inputs) + (lower @ noise).squeeze(-1)
    expected = torch.softmax(draws, dim=-1).mean(0)  # Monte-Carlo error ~1e-3
    predictive = predict_glm(md, posterior, inputs, link="mc", key=fp.random.key(0), num_samples=20_000)
    torch.testing.assert_close(predictive.mean, expected, rtol=0.0, atol=0.01)
    with pytest.raises(ValueError, match="key"):
        predict_glm(md, posterior, inputs, link="mc")
    with pytest.raises(ValueError, match="link"):
        predict_glm(md, posterior, inputs, link="logit")


def test_monte_carlo_predictive_equals_loop_over_samples():
    md, params, _, batches = problem()
    posterior = fit_laplace(md, params, batches, structure="kron", prior_precision=0.5)
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    key = fp.random.key(11)
    samples = sample_parameters(posterior, key, 7)
    logits = torch.stack([md.apply({name: value[s] for name, value in samples.items()}, inputs) for s in range(7)])
    predictive = predict_mc(md, posterior, inputs, key, 7)
    assert_relative_close(predictive.mean, torch.softmax(logits, dim=-1).mean(0), TOL)
    assert_relative_close(predictive.variance, logits.var(0, correction=0), TOL)


def test_monte_carlo_regression_adds_noise_variance():
    md, params, _, batches = problem(loss="mse")
    posterior = fit_laplace(md, params, batches, structure="diag", sigma_noise=0.5)
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    key = fp.random.key(1)
    samples = sample_parameters(posterior, key, 6)
    outputs = torch.stack([md.apply({name: value[s] for name, value in samples.items()}, inputs) for s in range(6)])
    predictive = predict_mc(md, posterior, inputs, key, 6)
    assert_relative_close(predictive.mean, outputs.mean(0), TOL)
    assert_relative_close(predictive.variance, outputs.var(0, correction=0) + 0.25, TOL)


def test_glm_predictive_of_an_ensemble_under_vmap_equals_loop():
    md, params, _, batches = problem()
    posteriors = [fit_laplace(md, {k: v + 0.05 * i for k, v in params.items()}, batches, structure="kron",
                              prior_precision=1.0 + i) for i in range(3)]
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    looped = stack_trees([predict_glm(md, p, inputs) for p in posteriors])
    batched = vmap(lambda p: predict_glm(md, p, inputs))(stack_trees(posteriors))
    for a, b in zip(tree_leaves(batched), tree_leaves(looped), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
