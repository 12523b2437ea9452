"""The posterior precision ``s · C + P₀`` against dense float64 formulas, for every
curvature structure, with a scalar and a per-layer prior."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fprecond as fp
from fprecond.laplace import fit_laplace, posterior_precision, prior_groups

from tests.helpers import assert_relative_close
from tests.laplace.references import dense_curvature, prior_diagonal, problem

TOL = 1e-10
PER_LAYER = {"0": 0.5, "2": 2.0}


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
@pytest.mark.parametrize("structure", ["full", "layer", "kron", "unit", "diag"])
def test_precision_is_scaled_curvature_plus_prior(kind, structure):
    # Kronecker blocks are exact for one example (no weight sharing): test them there.
    md, params, batch, batches = problem(n=1 if structure == "kron" else 20)
    prior = torch.tensor([PER_LAYER["0"], PER_LAYER["2"]])
    posterior = fit_laplace(md, params, batches, kind=kind, structure=structure, prior_precision=prior)
    expected = dense_curvature(md, params, batch, kind, structure) + torch.diag(prior_diagonal(params, PER_LAYER))
    assert_relative_close(posterior_precision(posterior).to_dense(), expected, TOL)
    scalar = posterior_precision(posterior, torch.tensor(3.0)).to_dense()
    assert_relative_close(scalar, dense_curvature(md, params, batch, kind, structure) + 3.0 * torch.eye(len(scalar)),
                          TOL)


def test_regression_scale_uses_noise_and_temperature():
    # -log N(y | f, σ²) = (f - y)² / (2σ²) + const: the squared error's GGN (2 JᵀJ) times 1/(2σ²T).
    md, params, batch, batches = problem(loss="mse")
    sigma, temperature = 0.8, 1.3
    posterior = fit_laplace(md, params, batches, structure="full", prior_precision=0.7, sigma_noise=sigma,
                            temperature=temperature)
    expected = dense_curvature(md, params, batch, "ggn", "full") / (2 * sigma**2 * temperature)
    assert_relative_close(posterior_precision(posterior).to_dense(), expected + 0.7 * torch.eye(len(expected)), TOL)
    assert posterior.likelihood == "regression"
    assert int(posterior.n_targets) == batch[1].numel()


def test_posterior_records_loss_counts_and_mean():
    md, params, batch, batches = problem()
    posterior = fit_laplace(md, params, iter(batches), structure="diag", temperature=0.5)
    expected = F.cross_entropy(md.apply(params, batch[0]), batch[1], reduction="sum")
    torch.testing.assert_close(posterior.loss, expected.detach(), rtol=1e-12, atol=0.0)
    assert int(posterior.n_data) == 20 and int(posterior.n_targets) == 20
    assert float(posterior.likelihood_scale) == 2.0
    for name, value in params.items():
        assert torch.equal(posterior.mean[name], value)


class _Scaled(nn.Module):
    """A Linear layer and a free scalar parameter (outside supported layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.temperature


def test_prior_groups_are_layers_and_free_parameters_in_order():
    md, _, _, _ = problem()
    assert prior_groups(md) == (("0", ("0.weight", "0.bias")), ("2", ("2.weight", "2.bias")))
    scaled = fp.model(_Scaled(), fp.losses.cross_entropy())
    assert prior_groups(scaled) == (("temperature", ("temperature",)), ("linear", ("linear.weight", "linear.bias")))


def test_free_parameter_gets_its_own_prior_in_kron():
    md = fp.model(_Scaled().double(), fp.losses.cross_entropy())
    params = md.params()
    x, y = torch.randn(1, 3), torch.tensor([1])
    posterior = fit_laplace(md, params, [(x, y)], structure="kron", fallback="diag",
                            prior_precision=torch.tensor([5.0, 0.5]))
    dense = posterior_precision(posterior).to_dense()
    reference = dense_curvature(md, params, (x, y), "ggn", "layer")
    # kron with a diagonal fallback: the free parameter's block is its diagonal entry.
    assert_relative_close(torch.diagonal(dense)[0], reference[0, 0] + 5.0, TOL)
    assert_relative_close(dense[1:, 1:], reference[1:, 1:] + 0.5 * torch.eye(len(dense) - 1), TOL)


def test_bad_arguments_raise():
    md, params, _, batches = problem()
    with pytest.raises(ValueError, match="structure"):
        fit_laplace(md, params, batches, structure="lowrank")
    for bad in (0.0, -1.0, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -2.0])):
        with pytest.raises(ValueError, match="prior_precision"):
            fit_laplace(md, params, batches, prior_precision=bad)
    with pytest.raises(ValueError, match="sigma_noise"):
        fit_laplace(md, params, batches, sigma_noise=2.0)
    with pytest.raises(ValueError, match="temperature"):
        fit_laplace(md, params, batches, temperature=0.0)
    with pytest.raises(ValueError, match="key"):
        fit_laplace(md, params, batches, kind="fisher_mc")
    with pytest.raises(ValueError, match="params do not match"):
        fit_laplace(md, {"0.weight": params["0.weight"]}, batches)
