"""Against laplace-torch (Daxberger et al. 2021) with its default GGN backend, on the
same tiny float64 models and data: posterior precision, log marginal likelihood and
the GLM predictive agree to rounding (relative 1e-10).

laplace-torch keeps a Linear layer's bias as its own block in ``kron`` structure,
where fprecond folds it into the Kronecker factors (a homogeneous coordinate):
``kron`` is compared on bias-free models, ``full`` and ``diag`` on models with biases.
Its Kronecker factors are summed over batches with a rescaling that equals
fprecond's average for batches of equal size, which the comparison uses.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fprecond as fp
from fprecond.laplace import fit_laplace, log_marginal_likelihood, posterior_precision, predict_glm

from tests.helpers import assert_relative_close, require_peer

TOL = 1e-10


def _data(regression: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(20, 4, generator=g)
    targets = torch.randn(20, 2, generator=g) if regression else torch.randint(0, 3, (20,), generator=g)
    return inputs, targets


def _module(bias: bool, outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, outputs, bias=bias)).double()


def _peer_precision(peer, structure: str) -> torch.Tensor:
    precision = peer.posterior_precision
    if structure == "kron":
        return precision.to_matrix()
    return torch.diag(precision) if structure == "diag" else precision


@pytest.mark.parametrize("structure,bias", [("full", True), ("diag", True), ("kron", False), ("full", False)])
def test_classification_matches_laplace_torch(structure, bias):
    laplace_torch = require_peer("laplace")
    data = require_peer("torch.utils.data")
    module = _module(bias, 3)
    inputs, targets = _data(regression=False)
    peer = laplace_torch.Laplace(copy.deepcopy(module), "classification", subset_of_weights="all",
                                 hessian_structure=structure, prior_precision=0.7, temperature=0.9)
    peer.fit(data.DataLoader(data.TensorDataset(inputs, targets), batch_size=10))

    md = fp.model(module, fp.losses.cross_entropy())
    batches = [(inputs[:10], targets[:10]), (inputs[10:], targets[10:])]
    posterior = fit_laplace(md, md.params(), batches, structure=structure, prior_precision=0.7, temperature=0.9)

    assert_relative_close(posterior_precision(posterior).to_dense(), _peer_precision(peer, structure), TOL)
    torch.testing.assert_close(log_marginal_likelihood(posterior), peer.log_marginal_likelihood().detach(),
                               rtol=TOL, atol=0.0)
    test_inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    expected = peer(test_inputs, pred_type="glm", link_approx="probit")
    assert_relative_close(predict_glm(md, posterior, test_inputs).mean, expected, TOL)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_regression_matches_laplace_torch(structure):
    laplace_torch = require_peer("laplace")
    data = require_peer("torch.utils.data")
    module = _module(False, 2)
    inputs, targets = _data(regression=True)
    peer = laplace_torch.Laplace(copy.deepcopy(module), "regression", subset_of_weights="all",
                                 hessian_structure=structure, prior_precision=0.7, sigma_noise=0.8, temperature=1.3)
    peer.fit(data.DataLoader(data.TensorDataset(inputs, targets), batch_size=10))

    md = fp.model(module, fp.losses.mse())
    batches = [(inputs[:10], targets[:10]), (inputs[10:], targets[10:])]
    posterior = fit_laplace(md, md.params(), batches, structure=structure, prior_precision=0.7, sigma_noise=0.8,
                            temperature=1.3)

    assert_relative_close(posterior_precision(posterior).to_dense(), _peer_precision(peer, structure), TOL)
    torch.testing.assert_close(log_marginal_likelihood(posterior), peer.log_marginal_likelihood().detach(),
                               rtol=TOL, atol=0.0)
    test_inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    mean, covariance = peer(test_inputs, pred_type="glm")
    predictive = predict_glm(md, posterior, test_inputs)
    assert_relative_close(predictive.mean, mean, TOL)
    # laplace-torch returns the functional covariance; the predictive adds σ².
    assert_relative_close(predictive.variance, torch.diagonal(covariance, dim1=-2, dim2=-1) + 0.8**2, TOL)
