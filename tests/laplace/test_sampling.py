"""Samples from the Laplace posterior: exact whitening per sample, the empirical
covariance against the dense inverse precision, purity, and vmap equals a loop."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond.laplace import fit_laplace, posterior_precision, prior_groups, sample_parameters
from fprecond.laplace.sampling import standard_normal_like
from fprecond.tree import tree_leaves

from tests.helpers import make_problem, stack_trees
from tests.laplace.references import problem

STRUCTURES = ["full", "layer", "kron", "unit", "diag"]
SAMPLES = 20_000
# With S samples the empirical covariance's relative Frobenius error is about sqrt((P+1)/S)
# times a factor of order one (P = 38 here: ~0.04); 0.08 leaves room without hiding a wrong scale.
COVARIANCE_TOL = 0.08


def _flat(samples: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.reshape(value.shape[0], -1) for value in samples.values()], dim=1)


def _posterior(structure: str, seed: int = 0, prior=None):
    md, params, _, batches = problem(seed=seed)
    prior = torch.tensor([0.5, 2.0]) if prior is None else prior
    return md, params, fit_laplace(md, params, batches, structure=structure, prior_precision=prior)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_each_sample_is_whitened_noise(structure):
    # θ_s - θ* = F⁻ᵀ z_s with P = F Fᵀ, hence (θ_s - θ*)ᵀ P (θ_s - θ*) = ||z_s||² for every
    # sample, exactly.
    _, params, posterior = _posterior(structure)
    key = fp.random.key(3)
    samples = sample_parameters(posterior, key, 16)
    deviation = _flat(samples) - _flat({k: v.unsqueeze(0) for k, v in params.items()})
    precision = posterior_precision(posterior).to_dense()
    quadratic = torch.einsum("sp,pq,sq->s", deviation, precision, deviation)
    noise = _flat(standard_normal_like(key, params, 16))
    torch.testing.assert_close(quadratic, noise.square().sum(dim=1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_empirical_covariance_matches_dense_inverse(structure):
    _, params, posterior = _posterior(structure)
    samples = _flat(sample_parameters(posterior, fp.random.key(0), SAMPLES))
    covariance = torch.linalg.inv(posterior_precision(posterior).to_dense())
    empirical = torch.cov(samples.T)
    error = torch.linalg.matrix_norm(empirical - covariance) / torch.linalg.matrix_norm(covariance)
    assert error < COVARIANCE_TOL, float(error)
    mean_error = (samples.mean(0) - _flat({k: v.unsqueeze(0) for k, v in params.items()})[0]).abs().max()
    assert mean_error < 5 * covariance.diagonal().max().sqrt() / SAMPLES**0.5


def test_same_key_same_samples_and_keys_differ():
    _, _, posterior = _posterior("kron")
    first = sample_parameters(posterior, fp.random.key(1), 4)
    again = sample_parameters(posterior, fp.random.key(1), 4)
    other = sample_parameters(posterior, fp.random.key(2), 4)
    for name in first:
        assert torch.equal(first[name], again[name])
        assert not torch.allclose(first[name], other[name])
        assert first[name].shape == (4, *posterior.mean[name].shape)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_ensemble_of_posteriors_and_keys_under_vmap_equals_loop(structure):
    posteriors = [_posterior(structure, seed=seed, prior=torch.tensor(1.0 + seed))[2] for seed in range(3)]
    keys = torch.stack([fp.random.key(seed) for seed in range(3)])
    looped = stack_trees([sample_parameters(p, k, 5) for p, k in zip(posteriors, keys)])
    batched = vmap(lambda p, k: sample_parameters(p, k, 5))(stack_trees(posteriors), keys)
    for a, b in zip(tree_leaves(batched), tree_leaves(looped), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # One posterior, a batch of keys.
    looped = stack_trees([sample_parameters(posteriors[0], k, 5) for k in keys])
    batched = vmap(lambda k: sample_parameters(posteriors[0], k, 5))(keys)
    for a, b in zip(tree_leaves(batched), tree_leaves(looped), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_bad_arguments_raise():
    _, _, posterior = _posterior("diag")
    with pytest.raises(ValueError, match="num_samples"):
        sample_parameters(posterior, fp.random.key(0), 0)
    with pytest.raises(TypeError, match="key"):
        sample_parameters(posterior, 0, 3)


@pytest.mark.parametrize("case_name", ["cnn", "embedding"])
@pytest.mark.parametrize("structure", ["kron", "unit"])
def test_whitening_holds_for_conv_embedding_and_norm_layers(case_name, structure):
    md, params, batch = make_problem(case_name, ("cross_entropy", "mean"), n=4)
    groups = len(prior_groups(md))
    posterior = fit_laplace(md, params, [batch], structure=structure,
                            prior_precision=torch.linspace(0.5, 2.0, groups))
    key = fp.random.key(5)
    samples = sample_parameters(posterior, key, 6)
    deviation = _flat(samples) - _flat({k: v.unsqueeze(0) for k, v in params.items()})
    precision = posterior_precision(posterior).to_dense()
    quadratic = torch.einsum("sp,pq,sq->s", deviation, precision, deviation)
    noise = _flat(standard_normal_like(key, params, 6))
    torch.testing.assert_close(quadratic, noise.square().sum(dim=1), rtol=1e-9, atol=1e-9)
