"""Every kind x structure against dense brute-force matrices (float64).

``full`` equals the dense matrix; ``layer``, ``unit`` and ``diag`` equal its
matching blocks, with the blocks defined from the layer definitions in
``references.py``; ``mvp`` equals ``to_dense() @ v``.
"""

from __future__ import annotations

import pytest
import torch

import fprecond as fp
from fprecond.curvature import estimate
from fprecond.tree import ravel

from tests.curvature.references import block_mask, dense_exact_fisher_ce, layer_groups, unit_groups
from tests.helpers import (
    random_like,
    assert_relative_close,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    make_problem,
)

TOL = 1e-10
STRUCTURES = ("full", "layer", "unit", "diag")


def _reference(kind: str, md, params, batch) -> torch.Tensor:
    if kind == "hessian":
        return dense_hessian(md, params, batch)
    if kind in ("ggn", "fisher"):
        return dense_ggn(md, params, batch)
    if kind == "empirical_fisher_term":
        return dense_empirical_fisher(md, params, batch, per="term")
    return dense_empirical_fisher(md, params, batch)


def _expected(structure: str, dense: torch.Tensor, md) -> torch.Tensor:
    if structure == "full":
        return dense
    if structure == "diag":
        return torch.diag_embed(torch.diagonal(dense))
    groups = layer_groups(md) if structure == "layer" else unit_groups(md)
    return dense * block_mask(dense.shape[0], groups)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "empirical_fisher", "empirical_fisher_term"])
def test_structures_equal_dense_blocks(case_name, loss_key, kind):
    md, params, batch = make_problem(case_name, loss_key)
    dense = _reference(kind, md, params, batch)
    name, per = (kind, "example") if kind != "empirical_fisher_term" else ("empirical_fisher", "term")
    vector = random_like(params, seed=5)
    for structure in STRUCTURES:
        curvature = estimate(md, params, batch, kind=name, structure=structure, per=per)
        expected = _expected(structure, dense, md)
        assert_relative_close(curvature.to_dense(), expected, TOL)
        product = ravel(curvature.mvp(vector))[0]
        assert_relative_close(product, expected @ ravel(vector)[0], TOL)
        assert_relative_close(curvature.trace(), torch.trace(expected), TOL)


@pytest.mark.parametrize("case", ["mlp", "sequence"])
def test_exact_fisher_equals_expectation_over_classes(case):
    """The exact Fisher (through the loss Hessian's square root) equals the expected
    outer product of gradients with targets enumerated over all classes."""
    md, params, batch = make_problem(case, ("cross_entropy", "mean"), n=3)
    expected = dense_exact_fisher_ce(md, params, batch)
    assert_relative_close(estimate(md, params, batch, kind="fisher", structure="full").to_dense(), expected, TOL)


def test_empirical_fisher_definitions_differ_only_for_sequences():
    md, params, batch = make_problem("sequence", ("cross_entropy", "mean"))
    example = estimate(md, params, batch, kind="empirical_fisher", structure="full").to_dense()
    term = estimate(md, params, batch, kind="empirical_fisher", structure="full", per="term").to_dense()
    assert (example - term).norm() > 1e-3 * example.norm()
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    example = estimate(md, params, batch, kind="empirical_fisher", structure="full").to_dense()
    term = estimate(md, params, batch, kind="empirical_fisher", structure="full", per="term").to_dense()
    assert_relative_close(term, example, TOL)


def test_fisher_mc_tends_to_the_exact_fisher():
    """Relative error of the Monte-Carlo diagonal falls like 1/sqrt(samples); the
    empirical Fisher (observed targets, a wrong estimator of the Fisher) stays far."""
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=8)
    exact = estimate(md, params, batch, kind="fisher", structure="diag").to_dense().diagonal()

    def error(samples: int) -> float:
        mc = estimate(md, params, batch, kind="fisher_mc", structure="diag", key=fp.random.key(3), samples=samples)
        return ((mc.to_dense().diagonal() - exact).norm() / exact.norm()).item()

    few, many = error(16), error(4096)
    assert many < 0.06, many
    assert many < few / 4, (few, many)
    empirical = estimate(md, params, batch, kind="empirical_fisher", structure="diag").to_dense().diagonal()
    assert ((empirical - exact).norm() / exact.norm()).item() > 3 * many


def test_fisher_mc_kron_matches_mse_expectation():
    """For MSE, the sampled residuals have covariance 2I: the MC output factor tends to the exact one."""
    md, params, batch = make_problem("mlp", ("mse", "sum"), n=4)
    exact = estimate(md, params, batch, kind="fisher", structure="kron")
    mc = estimate(md, params, batch, kind="fisher_mc", structure="kron", key=fp.random.key(0), samples=4096)
    for exact_block, mc_block in zip(exact.blocks, mc.blocks):
        assert_relative_close(mc_block.input_factor, exact_block.input_factor, TOL)
        assert_relative_close(mc_block.output_factor, exact_block.output_factor, 0.08)
