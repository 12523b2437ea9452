"""Diagonal estimators with explicit keys: each draw against its dense formula, and the
mean over many keys against the exact diagonal (of the Hessian, of the GGN)."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond.curvature.hutchinson import gnb_diagonal, hutchinson_diagonal, probe_vectors
from fprecond.tree import ravel, tree_leaves

from tests.helpers import (
    assert_relative_close,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    flat_function,
    make_problem,
    reference_loss,
    reference_reduction_factor,
)

KEY = fp.random.key(11)
PROBLEMS = [("mlp", ("cross_entropy", "mean")), ("cnn", ("cross_entropy", "sum")),
            ("sequence", ("cross_entropy", "mean")), ("embedding", ("cross_entropy", "mean")),
            ("mlp", ("mse", "mean")), ("sequence", ("mse", "sum"))]


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_probe_vectors_are_keyed_draws_of_each_leaf(distribution):
    _, params, _ = make_problem("cnn", ("cross_entropy", "mean"))
    probe = probe_vectors(KEY, params, distribution)
    assert list(probe) == list(params)
    for name, p in params.items():
        assert probe[name].shape == p.shape and probe[name].dtype == p.dtype
    flat = ravel(probe)[0]
    if distribution == "rademacher":
        assert set(flat.tolist()) == {-1.0, 1.0}
    assert torch.equal(flat, ravel(probe_vectors(KEY, params, distribution))[0])  # reproducible
    assert not torch.equal(flat, ravel(probe_vectors(fp.random.fold_in(KEY, 1), params, distribution))[0])
    leaves = tree_leaves(probe)
    assert not torch.equal(leaves[1].reshape(-1)[:3], leaves[3].reshape(-1)[:3])  # leaves differ


@pytest.mark.parametrize("case,loss_key", PROBLEMS)
@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchinson_draw_is_z_times_dense_hessian_z(case, loss_key, distribution):
    md, params, batch = make_problem(case, loss_key)
    z = ravel(probe_vectors(KEY, params, distribution))[0]
    expected = z * (dense_hessian(md, params, batch) @ z)
    actual = ravel(hutchinson_diagonal(md, params, batch, KEY, distribution=distribution))[0]
    assert_relative_close(actual, expected, 1e-10)


@pytest.mark.parametrize("case,loss_key", PROBLEMS)
def test_gnb_draw_is_the_scaled_square_of_the_sampled_gradient(case, loss_key):
    """``R ĝ ⊙ ĝ`` with ``ĝ`` by plain autograd of the reference loss on targets sampled with the key."""
    md, params, batch = make_problem(case, loss_key)
    inputs, _ = batch
    outputs = md.apply(params, inputs).detach()
    sampled = md.loss.sample_targets(outputs, KEY)
    fn, flat = flat_function(params, lambda p: reference_loss(md.loss, md.apply(p, inputs), sampled))
    theta = flat.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(fn(theta), theta)
    expected = reference_reduction_factor(md.loss, outputs) * gradient**2
    actual = ravel(gnb_diagonal(md, params, batch, KEY))[0]
    assert_relative_close(actual, expected, 1e-10)


def _mean_and_standard_error(draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.cat([d.reshape(d.shape[0], -1) for d in draws.values()], dim=1)
    return flat.mean(0), flat.std(0) / flat.shape[0] ** 0.5


SAMPLES = 4000


@pytest.mark.parametrize("case,loss_key", [("mlp", ("cross_entropy", "mean")), ("sequence", ("cross_entropy", "mean")),
                                           ("mlp", ("mse", "mean"))])
def test_gnb_mean_over_keys_is_the_ggn_diagonal(case, loss_key):
    """Within 5 standard errors per entry (and 10% in norm) after 4000 draws; the
    empirical Fisher's diagonal (the batch's own targets) is not."""
    md, params, batch = make_problem(case, loss_key, n=6)
    keys = fp.random.key(torch.arange(SAMPLES))
    draws = vmap(lambda k: gnb_diagonal(md, params, batch, k))(keys)
    mean, error = _mean_and_standard_error(draws)
    exact = torch.diagonal(dense_ggn(md, params, batch))
    assert ((mean - exact).abs() <= 5 * error + 1e-12).all()
    assert_relative_close(mean, exact, 0.1)
    if loss_key[0] == "cross_entropy":  # the test tells the two apart
        empirical = torch.diagonal(dense_empirical_fisher(md, params, batch))
        assert not ((mean - empirical).abs() <= 5 * error + 1e-12).all()


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_hutchinson_mean_over_keys_is_the_hessian_diagonal(case, distribution):
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    keys = fp.random.key(torch.arange(SAMPLES))
    draws = vmap(lambda k: hutchinson_diagonal(md, params, batch, k, distribution=distribution))(keys)
    mean, error = _mean_and_standard_error(draws)
    hessian = dense_hessian(md, params, batch)
    exact = torch.diagonal(hessian)
    assert ((mean - exact).abs() <= 5 * error + 1e-12).all()
    # The variance of one draw: Σ_{j≠i} H_ij² (+ 2 H_ii² for Gaussian probes).
    variance = (hessian**2).sum(1) - exact**2 + (2 * exact**2 if distribution == "normal" else 0.0)
    observed = (error**2) * SAMPLES
    assert torch.allclose(observed, variance, rtol=0.25, atol=1e-10)


def test_estimators_need_a_valid_distribution():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_diagonal(md, params, batch, KEY, distribution="uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distribution"):
        probe_vectors(KEY, params, "gumbel")  # type: ignore[arg-type]
