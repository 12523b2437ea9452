"""Autodiff primitives against dense brute force (float64, relative error 1e-10)."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond.tree import ravel, tree_map

from tests.helpers import (
    random_like,
    stack_trees,
    assert_relative_close,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_jacobian,
    make_problem,
    reference_loss,
    require_peer,
)

TOL = 1e-10


def _flat(tree) -> torch.Tensor:
    return ravel(tree)[0]


def test_loss_and_grads_matches_autograd(case_name, loss_key):
    md, params, batch = make_problem(case_name, loss_key)
    value, grads = fp.loss_and_grads(md, params, batch)
    flat, unravel = ravel(params)
    theta = flat.clone().requires_grad_(True)
    expected = reference_loss(md.loss, md.apply(unravel(theta), batch[0]), batch[1])
    (expected_grad,) = torch.autograd.grad(expected, theta)
    assert_relative_close(value, expected, TOL)
    assert_relative_close(_flat(grads), expected_grad, TOL)


def test_per_example_grads_match_a_loop(case_name, loss_key):
    md, params, (inputs, targets) = make_problem(case_name, loss_key)
    per_example = fp.per_example_grads(md, params, (inputs, targets))
    for n in range(targets.shape[0]):
        _, expected = fp.loss_and_grads(md, params, (inputs[n:n + 1], targets[n:n + 1]))
        assert_relative_close(_flat({k: v[n] for k, v in per_example.items()}), _flat(expected), TOL)
    # The batch gradient is their mean ("mean") or sum ("sum").
    _, batch_grad = fp.loss_and_grads(md, params, (inputs, targets))
    combine = torch.mean if md.loss.reduction == "mean" else torch.sum
    assert_relative_close(_flat(tree_map(lambda g: combine(g, 0), per_example)), _flat(batch_grad), TOL)


def test_hvp_equals_dense_hessian(case_name, loss_key):
    md, params, batch = make_problem(case_name, loss_key)
    vector = random_like(params)
    expected = dense_hessian(md, params, batch) @ _flat(vector)
    assert_relative_close(_flat(fp.hvp(md, params, batch, vector)), expected, TOL)


@pytest.mark.parametrize("product", [fp.ggn_vp, fp.fisher_vp], ids=["ggn", "fisher"])
def test_ggn_and_exact_fisher_products_equal_dense_ggn(case_name, loss_key, product):
    md, params, batch = make_problem(case_name, loss_key)
    vector = random_like(params)
    expected = dense_ggn(md, params, batch) @ _flat(vector)
    assert_relative_close(_flat(product(md, params, batch, vector)), expected, TOL)


@pytest.mark.parametrize("per", ["example", "term"])
def test_empirical_fisher_product_equals_dense(case_name, loss_key, per):
    md, params, batch = make_problem(case_name, loss_key)
    vector = random_like(params)
    expected = dense_empirical_fisher(md, params, batch, per=per) @ _flat(vector)
    assert_relative_close(_flat(fp.empirical_fisher_vp(md, params, batch, vector, per=per)), expected, TOL)


def test_output_jvp_and_vjp_equal_dense_jacobian(case_name, loss_key):
    md, params, (inputs, _) = make_problem(case_name, loss_key)
    jac = dense_jacobian(md, params, inputs)
    vector = random_like(params)
    outputs, jv = fp.jvp(md, params, inputs, vector)
    assert_relative_close(jv.reshape(-1), jac @ _flat(vector), TOL)
    cotangent = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(5))
    assert_relative_close(_flat(fp.vjp(md, params, inputs, cotangent)), jac.T @ cotangent.reshape(-1), TOL)


def test_hessian_of_sum_reduction_is_r_times_mean():
    """Scaling check independent of any helper: sum = (N·T) × mean for cross-entropy."""
    md_mean, params, batch = make_problem("sequence", ("cross_entropy", "mean"))
    md_sum, _, _ = make_problem("sequence", ("cross_entropy", "sum"))
    vector = random_like(params)
    terms = batch[1].numel()
    assert_relative_close(_flat(fp.ggn_vp(md_sum, params, batch, vector)),
                          terms * _flat(fp.ggn_vp(md_mean, params, batch, vector)), TOL)


# --------------------------------------------------------------------------- peer library


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_products_match_curvlinops(loss_name, reduction):
    """Scaling conventions checked against curvlinops-for-pytorch (an independent implementation)."""
    curvlinops = require_peer("curvlinops")
    md, params, (inputs, targets) = make_problem("mlp", (loss_name, reduction), n=6)
    torch_loss = (torch.nn.CrossEntropyLoss if loss_name == "cross_entropy" else torch.nn.MSELoss)(reduction=reduction)
    module_params = [p for p in md.module.parameters()]
    data = [(inputs, targets)]
    vector = random_like(params)
    flat_vector = _flat(vector)
    operators = {
        "hessian": (curvlinops.HessianLinearOperator, fp.hvp),
        "ggn": (curvlinops.GGNLinearOperator, fp.ggn_vp),
        "ef": (curvlinops.EFLinearOperator, fp.empirical_fisher_vp),
    }
    for name, (operator_class, product) in operators.items():
        operator = operator_class(md.module, torch_loss, module_params, data, check_deterministic=False)
        expected = operator @ flat_vector
        assert_relative_close(_flat(product(md, params, (inputs, targets), vector)), torch.as_tensor(expected), TOL)


# --------------------------------------------------------------------------- ensembles


@pytest.mark.parametrize(
    "primitive",
    ["loss_and_grads", "per_example_grads", "hvp", "ggn_vp", "fisher_vp", "empirical_fisher_vp", "jvp", "vjp"],
)
def test_vmap_over_ensemble_equals_loop(case_name, primitive):
    members = [make_problem(case_name, ("cross_entropy", "mean"), seed=seed) for seed in range(3)]
    md, _, batch = members[0]
    stacked = stack_trees([params for _, params, _ in members])
    vectors = stack_trees([random_like(params, seed=7 + i) for i, (_, params, _) in enumerate(members)])
    outputs_shape = md.apply(members[0][1], batch[0]).shape
    cotangents = torch.randn(3, *outputs_shape, generator=torch.Generator().manual_seed(11))

    def call(params, vector, cotangent):
        if primitive in ("loss_and_grads", "per_example_grads"):
            return getattr(fp, primitive)(md, params, batch)
        if primitive == "jvp":
            return fp.jvp(md, params, batch[0], vector)
        if primitive == "vjp":
            return fp.vjp(md, params, batch[0], cotangent)
        return getattr(fp, primitive)(md, params, batch, vector)

    batched = vmap(call)(stacked, vectors, cotangents)
    for i in range(3):
        member = tree_map(lambda x: x[i], (stacked, vectors, cotangents))
        looped = call(*member)
        expected = torch.cat([x.reshape(-1) for x in fp.tree.tree_leaves(looped)])
        actual = torch.cat([x[i].reshape(-1) for x in fp.tree.tree_leaves(batched)])
        assert_relative_close(actual, expected, 1e-12)
