"""Block algebra against dense linear algebra: damping, scaling, powers, averages."""

from __future__ import annotations

import pytest
import torch

from fprecond.curvature import KroneckerEigenBlock, estimate
from fprecond.tree import ravel, tree_map

from tests.curvature.references import block_mask, layer_groups
from tests.helpers import assert_relative_close, dense_empirical_fisher, make_problem, random_like

TOL = 1e-9


def _dense_power(matrix: torch.Tensor, exponent: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).pow(exponent)) @ vectors.T


@pytest.mark.parametrize("structure", ["full", "layer", "kron", "unit", "diag"])
@pytest.mark.parametrize("case", ["cnn", "embedding"])
def test_damped_powers_equal_dense_powers(case, structure):
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    curvature = estimate(md, params, batch, kind="ggn", structure=structure).damped(0.1)
    dense = curvature.to_dense()
    for exponent in (-1.0, -0.5, -0.25, 2.0):
        assert_relative_close(curvature.power(exponent).to_dense(), _dense_power(dense, exponent), TOL)
    assert_relative_close(curvature.inverse().to_dense() @ dense, torch.eye(dense.shape[0]), TOL)
    vector = random_like(params, seed=0)
    flat = ravel(vector)[0]
    assert_relative_close(ravel(curvature.inverse().mvp(vector))[0], torch.linalg.solve(dense, flat), TOL)
    assert_relative_close(curvature.quadratic_form(vector), flat @ dense @ flat, TOL)


def test_kronecker_eigenbasis_holds_the_same_matrix():
    md, params, batch = make_problem("mlp", ("mse", "mean"))
    curvature = estimate(md, params, batch, kind="ggn", structure="kron").damped(0.3)
    for block in curvature.blocks:
        eigen = block.eigendecomposition()
        assert isinstance(eigen, KroneckerEigenBlock)
        assert_relative_close(eigen.dense(), block.dense(), TOL)
        assert_relative_close(eigen.trace(), torch.trace(block.dense()), TOL)
        assert_relative_close(eigen.damped(0.2).dense(), block.dense() + 0.2 * torch.eye(block.size), TOL)


@pytest.mark.parametrize("structure", ["full", "layer", "kron", "unit", "diag"])
def test_scaling_and_moving_average(structure):
    md, params, batch = make_problem("sequence", ("mse", "sum"))
    first = estimate(md, params, batch, kind="ggn", structure=structure)
    shifted = tree_map(lambda p: p + 0.1, params)
    second = estimate(md, shifted, batch, kind="ggn", structure=structure)
    assert_relative_close(first.scaled(3.0).to_dense(), 3.0 * first.to_dense(), TOL)
    average = first.moving_average(second, 0.75)
    if structure != "kron":
        assert_relative_close(average.to_dense(), 0.75 * first.to_dense() + 0.25 * second.to_dense(), TOL)
    else:  # factor-wise, as K-FAC's running averages
        for mixed, a, b in zip(average.blocks, first.blocks, second.blocks):
            assert_relative_close(mixed.input_factor, 0.75 * a.input_factor + 0.25 * b.input_factor, TOL)
            assert_relative_close(mixed.output_factor, 0.75 * a.output_factor + 0.25 * b.output_factor, TOL)


def test_product_with_a_mismatched_vector_names_the_parameter():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    curvature = estimate(md, params, batch, kind="ggn", structure="kron")
    wrong = dict(params)
    wrong["0.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"vector\['0.bias'\] has shape \(7,\)"):
        curvature.mvp(wrong)
    with pytest.raises(ValueError, match="keys"):
        curvature.mvp({"0.weight": params["0.weight"]})


@pytest.mark.parametrize("case", ["mlp", "cnn", "sequence", "embedding"])
def test_low_rank_blocks_against_the_dense_empirical_fisher(case):
    """Both low-rank representations (factored outer products, dense rows): the matrix,
    products, trace, scaling and powers computed in the Gram space."""
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    curvature = estimate(md, params, batch, kind="empirical_fisher", structure="lowrank", fallback="diag")
    size = sum(p.numel() for p in params.values())
    dense = dense_empirical_fisher(md, params, batch) * block_mask(size, layer_groups(md))
    assert_relative_close(curvature.to_dense(), dense, TOL)
    vector = random_like(params, seed=0)
    flat = ravel(vector)[0]
    assert_relative_close(ravel(curvature.mvp(vector))[0], dense @ flat, TOL)
    assert_relative_close(curvature.trace(), torch.trace(dense), TOL)
    assert_relative_close(curvature.scaled(2.5).to_dense(), 2.5 * dense, TOL)
    damped = curvature.damped(0.1)
    for exponent in (-1.0, -0.5, 2.0):
        assert_relative_close(damped.power(exponent).to_dense(), _dense_power(dense + 0.1 * torch.eye(size), exponent),
                              TOL)
    kinds = {type(block).__name__ for block in curvature.blocks}
    assert kinds <= {"LowRankBlock", "FactoredLowRankBlock"}
