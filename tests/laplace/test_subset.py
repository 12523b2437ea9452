"""Last-layer and subnetwork Laplace: against laplace-torch's ``subset_of_weights="last_layer"``
and ``"subnetwork"``, and against dense float64 formulas (the summed-loss GGN restricted to
the subset); samples leave the other parameters bit for bit; vmap equals a loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import vmap

import fprecond as fp
from fprecond.laplace import (
    fit_laplace,
    functional_covariance,
    log_likelihood,
    log_marginal_likelihood,
    posterior_precision,
    predict_glm,
    predict_mc,
    sample_parameters,
)
from fprecond.laplace.sampling import standard_normal_like
from fprecond.tree import tree_leaves

from tests.helpers import assert_relative_close, dense_jacobian, require_peer, stack_trees
from tests.laplace.references import dense_curvature, dense_log_marginal, problem

TOL = 1e-10
MIXED = ("0.bias", "2.weight")  # one parameter of each layer: a subnetwork


def _index(params, names) -> torch.Tensor:
    """Flat indices of ``names`` in the ravelled ``params``."""
    parts, start = [], 0
    for name, value in params.items():
        if name in names:
            parts.append(torch.arange(start, start + value.numel()))
        start += value.numel()
    return torch.cat(parts)


def _flat(tree) -> torch.Tensor:
    return torch.cat([value.reshape(value.shape[0], -1) for value in tree.values()], dim=1)


# --------------------------------------------------------------------------- laplace-torch


def _peer_problem(regression: bool, last_bias: bool):
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(20, 4, generator=g)
    targets = torch.randn(20, 2, generator=g) if regression else torch.randint(0, 3, (20,), generator=g)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2 if regression else 3, bias=last_bias)).double()
    md = fp.model(module, fp.losses.mse() if regression else fp.losses.cross_entropy())
    return module, md, inputs, targets


def _fit_peer(laplace_torch, data, module, regression, inputs, targets, **options):
    peer = laplace_torch.Laplace(copy.deepcopy(module), "regression" if regression else "classification",
                                 prior_precision=0.7, temperature=0.9, **options)
    peer.fit(data.DataLoader(data.TensorDataset(inputs, targets), batch_size=10))
    return peer


# laplace-torch's last-layer kron keeps the bias as its own block; fprecond folds it into the
# Kronecker factors: kron is compared on a bias-free last layer, full and diag with a bias.
@pytest.mark.parametrize("regression,structure,last_bias", [
    (False, "full", True), (False, "diag", True), (False, "kron", False),
    (True, "full", True), (True, "kron", False)])
def test_last_layer_matches_laplace_torch(regression, structure, last_bias):
    laplace_torch = require_peer("laplace")
    data = require_peer("torch.utils.data")
    module, md, inputs, targets = _peer_problem(regression, last_bias)
    noise = {"sigma_noise": 0.8} if regression else {}
    peer = _fit_peer(laplace_torch, data, module, regression, inputs, targets, subset_of_weights="last_layer",
                     hessian_structure=structure, **noise)
    batches = [(inputs[:10], targets[:10]), (inputs[10:], targets[10:])]
    posterior = fit_laplace(md, md.params(), batches, structure=structure, prior_precision=0.7, temperature=0.9,
                            subset="last_layer", **noise)
    assert posterior.subset == (("2.weight", "2.bias") if last_bias else ("2.weight",))

    expected = peer.posterior_precision
    if structure != "full":
        expected = expected.to_matrix() if structure == "kron" else torch.diag(expected)
    assert_relative_close(posterior_precision(posterior).to_dense(), expected, TOL)
    torch.testing.assert_close(log_marginal_likelihood(posterior), peer.log_marginal_likelihood().detach(),
                               rtol=TOL, atol=0.0)
    test_inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    predictive = predict_glm(md, posterior, test_inputs)
    if regression:
        mean, covariance = peer(test_inputs, pred_type="glm")
        assert_relative_close(predictive.mean, mean, TOL)
        assert_relative_close(predictive.variance, torch.diagonal(covariance, dim1=-2, dim2=-1) + 0.8**2, TOL)
        # Another (δ, σ): the noise rescales the precision and the Gaussian normaliser.
        torch.testing.assert_close(log_marginal_likelihood(posterior, 0.5, 1.3),
                                   peer.log_marginal_likelihood(torch.tensor(0.5), torch.tensor(1.3)).detach(),
                                   rtol=TOL, atol=0.0)
    else:
        assert_relative_close(predictive.mean, peer(test_inputs, pred_type="glm", link_approx="probit"), TOL)


def test_subnetwork_matches_laplace_torch():
    laplace_torch = require_peer("laplace")
    data = require_peer("torch.utils.data")
    module, md, inputs, targets = _peer_problem(False, True)
    params = md.params()
    peer = _fit_peer(laplace_torch, data, module, False, inputs, targets, subset_of_weights="subnetwork",
                     subnetwork_indices=_index(params, MIXED), hessian_structure="full")
    batches = [(inputs[:10], targets[:10]), (inputs[10:], targets[10:])]
    posterior = fit_laplace(md, params, batches, structure="full", prior_precision=0.7, temperature=0.9,
                            subset=list(reversed(MIXED)))  # any order: kept in named_parameters order
    assert posterior.subset == MIXED
    assert_relative_close(posterior_precision(posterior).to_dense(), peer.posterior_precision, TOL)
    torch.testing.assert_close(log_marginal_likelihood(posterior), peer.log_marginal_likelihood().detach(),
                               rtol=TOL, atol=0.0)
    test_inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    assert_relative_close(predict_glm(md, posterior, test_inputs).mean,
                          peer(test_inputs, pred_type="glm", link_approx="probit"), TOL)


# --------------------------------------------------------------------------- dense references


@pytest.mark.parametrize("kind,structure,subset", [
    ("ggn", "full", "last_layer"), ("hessian", "full", "last_layer"), ("ggn", "layer", "last_layer"),
    ("ggn", "kron", "last_layer"), ("ggn", "unit", "last_layer"), ("ggn", "diag", "last_layer"),
    ("ggn", "full", MIXED), ("ggn", "layer", MIXED), ("ggn", "diag", MIXED)])
def test_subset_matches_dense_restriction(kind, structure, subset):
    # Kronecker blocks are exact for one example (no weight sharing): test them there.
    md, params, batch, batches = problem(n=1 if structure == "kron" else 20)
    names = ("2.weight", "2.bias") if subset == "last_layer" else subset
    per_group = torch.tensor([0.5, 2.0]) if subset == MIXED else torch.tensor(0.7)
    posterior = fit_laplace(md, params, batches, kind=kind, structure=structure, prior_precision=per_group,
                            temperature=0.8, subset=subset)
    assert posterior.subset == names
    assert posterior.groups == ((("0", ("0.bias",)), ("2", ("2.weight",))) if subset == MIXED
                                else (("2", ("2.weight", "2.bias")),))
    # Only the subset's blocks are estimated.
    assert posterior.curvature.names == names and posterior.num_params == sum(params[n].numel() for n in names)

    index = _index(params, names)
    prior = torch.cat([torch.full((params[name].numel(),), float(posterior.prior_per_parameter()[name]))
                       for name in names])
    curvature = dense_curvature(md, params, batch, kind, structure)[index][:, index]
    precision = curvature / 0.8 + torch.diag(prior)
    assert_relative_close(posterior_precision(posterior).to_dense(), precision, TOL)
    # The prior term covers the subset only.
    expected = dense_log_marginal(log_likelihood(posterior), precision, prior, {n: params[n] for n in names})
    torch.testing.assert_close(log_marginal_likelihood(posterior), expected, rtol=1e-11, atol=1e-11)

    inputs = torch.randn(4, 4, generator=torch.Generator().manual_seed(9))
    jacobian = dense_jacobian(md, params, inputs)[:, index]  # (N·K, |S|): the subset's columns
    dense = jacobian @ torch.linalg.inv(precision) @ jacobian.T
    blocks = torch.stack([dense[3 * i:3 * i + 3, 3 * i:3 * i + 3] for i in range(4)])
    assert_relative_close(functional_covariance(md, posterior, inputs).covariance, blocks, TOL)


class _Scaled(nn.Module):
    """A free scalar parameter (outside supported layers) and a Linear output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.3))
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.temperature)


def test_last_layer_kron_ignores_parameters_outside_the_subset():
    # The free parameter would need fallback='diag' in kron; outside the subset it gets no block.
    md = fp.model(_Scaled().double(), fp.losses.cross_entropy())
    params = md.params()
    x, y = torch.randn(1, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([1])
    posterior = fit_laplace(md, params, [(x, y)], structure="kron", subset="last_layer", prior_precision=0.4)
    index = _index(params, ("linear.weight", "linear.bias"))
    expected = dense_curvature(md, params, (x, y), "ggn", "full")[index][:, index]
    assert_relative_close(posterior_precision(posterior).to_dense(), expected + 0.4 * torch.eye(len(index)), TOL)
    with pytest.raises(ValueError, match="fallback"):
        fit_laplace(md, params, [(x, y)], structure="kron", subset=["temperature", "linear.weight", "linear.bias"])


# --------------------------------------------------------------------------- samples


@pytest.mark.parametrize("structure,subset", [("kron", "last_layer"), ("full", MIXED)])
def test_subset_samples_fix_the_other_parameters_and_whiten_the_subset(structure, subset):
    md, params, _, batches = problem()
    posterior = fit_laplace(md, params, batches, structure=structure, subset=subset, prior_precision=0.6)
    key = fp.random.key(4)
    samples = sample_parameters(posterior, key, 16)
    assert list(samples) == list(params)
    for name, value in params.items():
        assert samples[name].shape == (16, *value.shape)
        if name not in posterior.subset:
            assert torch.equal(samples[name], value.expand(16, *value.shape))  # bit for bit
    # (θ_S - θ*_S)ᵀ P (θ_S - θ*_S) = ||z||² for every sample, z drawn over the subset only.
    covered = posterior.subset_mean()
    deviation = _flat({n: samples[n] for n in covered}) - _flat({n: v.unsqueeze(0) for n, v in covered.items()})
    quadratic = torch.einsum("sp,pq,sq->s", deviation, posterior_precision(posterior).to_dense(), deviation)
    noise = _flat(standard_normal_like(key, covered, 16))
    torch.testing.assert_close(quadratic, noise.square().sum(dim=1), rtol=1e-9, atol=1e-9)
    # The Monte-Carlo predictive runs the model on exactly these samples.
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    logits = torch.stack([md.apply({n: v[s] for n, v in samples.items()}, inputs) for s in range(16)])
    assert_relative_close(predict_mc(md, posterior, inputs, key, 16).mean, torch.softmax(logits, -1).mean(0), TOL)


def test_subset_samples_under_vmap_equal_a_loop():
    md, params, _, batches = problem()
    posteriors = [fit_laplace(md, {k: v + 0.05 * i for k, v in params.items()}, batches, structure="kron",
                              subset="last_layer", prior_precision=1.0 + i) for i in range(3)]
    keys = torch.stack([fp.random.key(seed) for seed in range(3)])
    looped = stack_trees([sample_parameters(posteriors[0], k, 5) for k in keys])
    batched = vmap(lambda k: sample_parameters(posteriors[0], k, 5))(keys)
    for a, b in zip(tree_leaves(batched), tree_leaves(looped), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    looped = stack_trees([sample_parameters(p, k, 5) for p, k in zip(posteriors, keys)])
    batched = vmap(lambda p, k: sample_parameters(p, k, 5))(stack_trees(posteriors), keys)
    for a, b in zip(tree_leaves(batched), tree_leaves(looped), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- bad subsets


class _Free(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_bad_subsets_raise():
    md, params, _, batches = problem(n=1)
    for structure in ("kron", "unit"):  # one block over a layer's weight and bias
        with pytest.raises(ValueError, match="layer '0'.*'0.bias'"):
            fit_laplace(md, params, batches, structure=structure, subset=["0.weight", "2.weight", "2.bias"])
    with pytest.raises(ValueError, match="subset"):
        fit_laplace(md, params, batches, subset="first_layer")
    with pytest.raises(ValueError, match="unknown parameters"):
        fit_laplace(md, params, batches, subset=["2.kernel"])
    with pytest.raises(ValueError, match="empty"):
        fit_laplace(md, params, batches, subset=[])
    with pytest.raises(ValueError, match="more than once"):
        fit_laplace(md, params, batches, subset=["2.bias", "2.bias"])
    with pytest.raises(TypeError, match="names"):
        fit_laplace(md, params, batches, subset=[2])
    with pytest.raises(ValueError, match="prior_precision"):  # one prior group in the last layer
        fit_laplace(md, params, batches, subset="last_layer", prior_precision=torch.tensor([1.0, 2.0]))
    free = fp.model(_Free().double(), fp.losses.cross_entropy())
    with pytest.raises(ValueError, match="supported layer"):
        fit_laplace(free, free.params(), [(torch.ones(2, 3), torch.tensor([0, 1]))], structure="diag",
                    subset="last_layer")
    # Every parameter, named explicitly, is the default posterior bit for bit.
    named = fit_laplace(md, params, batches, structure="kron", subset=list(params))
    default = fit_laplace(md, params, batches, structure="kron")
    for a, b in zip(tree_leaves(named), tree_leaves(default), strict=True):
        assert torch.equal(a, b)
