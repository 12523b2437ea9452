"""Solvers on curvature blocks: every structure x solver against a dense function of
the dense matrix, Kronecker factored damping against its written formula, and
finite results on singular and indefinite curvature."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond import solvers
from fprecond.curvature import KroneckerBlock, estimate
from fprecond.curvature.lowrank import FactoredLowRankBlock, LowRankBlock
from fprecond.tree import ravel, tree_all_finite

from tests.helpers import assert_relative_close, make_problem, random_like, stack_trees

DAMPING = 0.1
STRUCTURES = ["full", "layer", "unit", "diag", "lowrank"]


def dense_power(matrix: torch.Tensor, exponent: float, damping: float, eigenvalues: str = "clamp") -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    values = values.abs() if eigenvalues == "abs" else values.clamp(min=0.0)
    return vectors @ torch.diag((values + damping) ** exponent) @ vectors.T


def curvature_of(structure: str, case: str = "mlp", kind: str = "empirical_fisher"):
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    return estimate(md, params, batch, kind=kind, structure=structure, fallback="diag"), params


SOLVER_CASES = {
    "cholesky": (solvers.cholesky(kron="exact"), -1.0),
    "eigh": (solvers.eigh(), -1.0),
    "eigh-power": (solvers.eigh(power=-0.25), -0.25),
    "root-eigh": (solvers.inverse_root(4, kron="exact"), -0.25),
    "root-newton": (solvers.inverse_root(2, method="newton", kron="exact"), -0.5),
    "newton-schulz": (solvers.newton_schulz(kron="exact"), -1.0),
    "cg": (solvers.conjugate_gradient(iterations=200, tol=1e-14), -1.0),
}


@pytest.mark.parametrize("case", ["mlp", "cnn", "sequence", "embedding"])
@pytest.mark.parametrize("structure", STRUCTURES + ["kron"])
@pytest.mark.parametrize("solver_name", list(SOLVER_CASES))
def test_solver_matches_dense_function(case, structure, solver_name):
    solver, exponent = SOLVER_CASES[solver_name]
    curvature, params = curvature_of(structure, case)
    refreshed = solver.refresh(curvature, DAMPING)
    assert int(refreshed.failures) == 0
    vector = random_like(params)
    result = ravel(solver.apply(refreshed.preconditioner, vector))[0]
    expected = dense_power(curvature.to_dense(), exponent, DAMPING) @ ravel(vector)[0]
    tol = 1e-6 if solver_name in ("root-newton", "newton-schulz") else 1e-9
    assert_relative_close(result, expected, tol)


@pytest.mark.parametrize("pi", [True, False])
@pytest.mark.parametrize("solver", [solvers.cholesky, solvers.newton_schulz])
def test_factored_kronecker_damping_formula(pi, solver):
    """K-FAC's inverse: per layer (G + √λ/π I)⁻¹ M (A + π√λ I)⁻¹, π² = (tr A/dim A)/(tr G/dim G)."""
    curvature, params = curvature_of("kron", "cnn")
    preconditioner = solver(pi=pi).refresh(curvature, DAMPING).preconditioner
    vector = random_like(params)
    product = solver().apply(preconditioner, vector)
    for block in curvature.blocks:
        assert isinstance(block, KroneckerBlock)
        a, g = block.input_factor[0], block.output_factor[0]
        pi_value = torch.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])) if pi else 1.0
        root = DAMPING ** 0.5
        a_damped = a + pi_value * root * torch.eye(a.shape[0])
        g_damped = g + root / pi_value * torch.eye(g.shape[0])
        from fprecond.layers.layout import to_matrix
        matrix = to_matrix(block.layout, vector)[0]
        expected = torch.linalg.solve(g_damped, matrix) @ torch.linalg.inv(a_damped)
        actual = to_matrix(block.layout, product)[0]
        assert_relative_close(actual, expected, 1e-6 if solver is solvers.newton_schulz else 1e-10)


@pytest.mark.parametrize("eigenvalues", ["clamp", "abs"])
@pytest.mark.parametrize("structure", ["full", "layer", "kron", "diag"])
def test_indefinite_hessian(eigenvalues, structure):
    """Clamped or absolute eigenvalues of an indefinite Hessian, as the dense formula."""
    curvature, params = curvature_of(structure, "mlp", kind="hessian")
    dense = curvature.to_dense()
    if structure in ("full", "layer"):
        assert torch.linalg.eigvalsh(dense).min() < -1e-6  # the case is really indefinite
    solver = solvers.eigh(eigenvalues=eigenvalues)
    vector = random_like(params)
    result = ravel(solver.apply(solver.refresh(curvature, DAMPING).preconditioner, vector))[0]
    assert_relative_close(result, dense_power(dense, -1.0, DAMPING, eigenvalues) @ ravel(vector)[0], 1e-9)


@pytest.mark.parametrize("structure", ["full", "layer", "unit", "kron", "lowrank"])
def test_cholesky_on_singular_curvature_is_finite_and_counted(structure):
    """Zero damping on a rank-deficient curvature: Cholesky fails, the result stays finite."""
    curvature, params = curvature_of(structure, "mlp")
    refreshed = solvers.cholesky().refresh(curvature, 0.0)
    assert bool(tree_all_finite(refreshed.preconditioner))
    product = solvers.cholesky().apply(refreshed.preconditioner, random_like(params))
    assert bool(tree_all_finite(product))
    if structure != "lowrank":  # the Gram matrix of 4 examples is itself regular
        assert int(refreshed.failures) > 0


def test_low_rank_blocks_use_the_gram_space():
    """MLP layers without sharing: factored vectors, and the cached inverse keeps the
    low-rank form (nothing of size P x P is formed)."""
    curvature, _ = curvature_of("lowrank", "mlp")
    assert all(isinstance(b, FactoredLowRankBlock) for b in curvature.blocks)
    preconditioner = solvers.cholesky().refresh(curvature, DAMPING).preconditioner
    for block in preconditioner.blocks:
        assert isinstance(block, FactoredLowRankBlock)
        assert block.core.shape == (4, 4)
    cnn, _ = curvature_of("lowrank", "cnn")
    assert isinstance(cnn.blocks[0], LowRankBlock)  # the conv layer's per-example matrices are smaller


def test_truncated_low_rank_is_the_best_approximation():
    curvature, _ = curvature_of("lowrank", "sequence")
    md, params, batch = make_problem("sequence", ("cross_entropy", "mean"))
    factored = estimate(md, params, batch, kind="empirical_fisher", structure="lowrank", truncate=2)
    exact = estimate(md, params, batch, kind="empirical_fisher", structure="lowrank", truncate=5)
    assert_relative_close(exact.to_dense(), curvature.to_dense(), 1e-12)
    for block, full in zip(factored.blocks, exact.blocks):
        assert isinstance(block, FactoredLowRankBlock) and block.outputs.shape[1] == 2
        matrices = torch.einsum("rqgo,rqgs->rgos", full.outputs, full.inputs)
        singular = torch.linalg.svdvals(matrices)
        truncated = torch.einsum("rqgo,rqgs->rgos", block.outputs, block.inputs)
        error = torch.linalg.matrix_norm(matrices - truncated).square()
        assert torch.allclose(error, singular[..., 2:].square().sum(-1), atol=1e-12)


def test_refresh_under_vmap_equals_loop():
    members = [make_problem("cnn", ("cross_entropy", "mean"), seed=s) for s in range(3)]
    curvatures = [estimate(md, p, b, kind="empirical_fisher", structure="kron") for md, p, b in members]
    solver = solvers.cholesky()
    stacked = stack_trees(curvatures)
    batched = vmap(lambda c: solver.refresh(c, DAMPING).preconditioner)(stacked)
    looped = stack_trees([solver.refresh(c, DAMPING).preconditioner for c in curvatures])
    for a, b in zip(fp.tree.tree_leaves(batched), fp.tree.tree_leaves(looped)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_solver_names_and_bad_options():
    assert isinstance(solvers.solver_from("cholesky"), solvers.CholeskySolver)
    with pytest.raises(ValueError, match="solver"):
        solvers.solver_from("qr")
    with pytest.raises(ValueError, match="kron"):
        solvers.cholesky(kron="blocks")
    with pytest.raises(ValueError, match="root"):
        solvers.inverse_root(0)
    with pytest.raises(ValueError, match="iterations"):
        solvers.conjugate_gradient(iterations=0)


@pytest.mark.parametrize("factor", [2.5, 0.0])
def test_woodbury_with_a_scaled_core(factor):
    """``K = c I`` (Cholesky root) and ``K = 0`` (semi-definite: the symmetric root)."""
    curvature, params = curvature_of("lowrank", "mlp")
    scaled = curvature.scaled(factor)
    vector = random_like(params)
    result = ravel(solvers.cholesky().apply(solvers.cholesky().refresh(scaled, DAMPING).preconditioner, vector))[0]
    dense = scaled.to_dense()
    assert_relative_close(result, torch.linalg.solve(dense + DAMPING * torch.eye(len(dense)), ravel(vector)[0]), 1e-10)
