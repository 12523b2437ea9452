"""fprecond.analysis against dense float64 references on tiny models: the operators against
the dense Hessian / GGN / empirical Fisher, top eigenpairs (Lanczos and power) against
``torch.linalg.eigh``, Lanczos through breakdowns, Hutchinson traces against ``tr(C)``, and
stochastic Lanczos quadrature against the dense spectrum and its moments."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond.analysis.density import spectral_density
from fprecond.analysis.eigenpairs import curvature_eigenpairs, top_eigenpairs
from fprecond.analysis.lanczos import lanczos, lanczos_quadrature, tridiagonal
from fprecond.analysis.operators import curvature_mvp
from fprecond.analysis.trace import hutchinson_trace
from fprecond.curvature.hutchinson import probe_vectors
from fprecond.tree import ravel, tree_leaves

from tests.helpers import (
    assert_relative_close,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    make_problem,
    random_like,
)

KEY = fp.random.key(2024)
LOSS = ("cross_entropy", "mean")
DENSE = {"hessian": dense_hessian, "ggn": dense_ggn, "fisher": dense_ggn,  # Fisher = GGN for cross-entropy
         "empirical_fisher": dense_empirical_fisher}


@functools.lru_cache(maxsize=None)
def problem(case: str = "mlp"):
    md, params, batch = make_problem(case, LOSS)
    return md, params, batch


@functools.lru_cache(maxsize=None)
def dense(case: str, kind: str) -> torch.Tensor:
    md, params, batch = problem(case)
    return DENSE[kind](md, params, batch)


def matrix_mvp(matrix: torch.Tensor):
    """A flat-vector operator from a dense matrix (fast, for the algorithmic tests)."""
    return lambda vector: matrix @ vector


def stacked_rows(tree, count: int) -> torch.Tensor:
    """``(count, P)`` flat vectors from a tree whose leaves lead with ``count``."""
    return torch.cat([leaf.reshape(count, -1) for leaf in tree_leaves(tree)], dim=1)


def dense_top(matrix: torch.Tensor, k: int, which: str = "algebraic") -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    order = values.argsort(descending=True) if which == "algebraic" else values.abs().argsort(descending=True)
    return values[order[:k]], vectors[:, order[:k]]


def assert_pairs_match(pairs, matrix: torch.Tensor, k: int, which: str, value_tol: float, cosine_tol: float):
    values, vectors = dense_top(matrix, k, which)
    assert (pairs.values - values).abs().max() <= value_tol * max(1.0, values.abs().max().item()), \
        (pairs.values, values)
    rows = stacked_rows(pairs.vectors, k) if not isinstance(pairs.vectors, torch.Tensor) else pairs.vectors
    cosines = (rows @ vectors).diagonal().abs()
    assert torch.all(cosines > 1 - cosine_tol), cosines
    assert torch.allclose(torch.linalg.vector_norm(rows, dim=1), torch.ones(k), atol=1e-12)


# --------------------------------------------------------------------------- operators


@pytest.mark.parametrize("kind", list(DENSE))
def test_curvature_mvp_matches_the_dense_matrix(kind):
    md, params, batch = problem("sequence")
    vector = random_like(params)
    product = curvature_mvp(md, params, batch, kind)(vector)
    assert list(product) == list(params)
    assert_relative_close(ravel(product)[0], dense("sequence", kind) @ ravel(vector)[0], 1e-10)


# --------------------------------------------------------------------------- top eigenpairs


@pytest.mark.parametrize("case", ["mlp", "sequence"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_lanczos_top_three_eigenpairs_match_eigh(case, kind):
    md, params, batch = problem(case)
    size = ravel(params)[0].numel()
    pairs = curvature_eigenpairs(md, params, batch, 3, key=KEY, kind=kind, iterations=size)
    for name, p in params.items():
        assert pairs.vectors[name].shape == (3, *p.shape)
    assert_pairs_match(pairs, dense(case, kind), 3, "algebraic", 1e-8, 1e-6)
    assert torch.all(pairs.residuals <= 1e-8), pairs.residuals
    assert torch.all(pairs.values[:-1] >= pairs.values[1:])


def test_lanczos_largest_magnitude_on_an_indefinite_hessian():
    md, params, batch = problem("mlp")
    matrix = dense("mlp", "hessian")
    assert torch.linalg.eigvalsh(matrix)[0] < 0  # indefinite, so "magnitude" differs from "algebraic"
    pairs = top_eigenpairs(curvature_mvp(md, params, batch), params, 3, key=KEY, iterations=43, which="magnitude")
    assert_pairs_match(pairs, matrix, 3, "magnitude", 1e-8, 1e-6)
    assert pairs.values.min() < 0


def test_few_lanczos_steps_give_interlaced_ritz_values_within_their_residuals():
    """Cauchy interlacing bounds the Ritz values by the extreme eigenvalues; the residual
    ``|β_m S_mk|`` bounds the distance to the nearest eigenvalue (both cannot fail for exact Lanczos)."""
    matrix = dense("mlp", "hessian")
    eigenvalues = torch.linalg.eigvalsh(matrix)
    start = ravel(random_like(problem("mlp")[1]))[0]
    pairs = top_eigenpairs(matrix_mvp(matrix), start, 3, key=KEY, iterations=25)
    assert pairs.values[0] <= eigenvalues[-1] + 1e-12
    distance = (pairs.values[:, None] - eigenvalues[None, :]).abs().min(dim=1).values
    assert torch.all(distance <= pairs.residuals + 1e-10), (distance, pairs.residuals)
    assert abs(pairs.values[0] - eigenvalues[-1]) < 1e-6  # the extreme value has converged after 25 of 43 steps


@pytest.mark.parametrize("kind,which", [("hessian", "algebraic"), ("ggn", "magnitude"), ("ggn", "algebraic")])
def test_power_iteration_with_deflation_converges_to_the_top(kind, which):
    matrix = dense("mlp", kind)
    like = torch.zeros(matrix.shape[0])
    pairs = top_eigenpairs(matrix_mvp(matrix), like, 2, key=KEY, iterations=300, method="power", which=which)
    assert_pairs_match(pairs, matrix, 2, which, 1e-8, 1e-6)
    assert torch.all(pairs.residuals <= 1e-4)


def test_power_iteration_on_the_model_operator_gives_pytree_vectors():
    md, params, batch = problem("mlp")
    pairs = curvature_eigenpairs(md, params, batch, 1, key=KEY, kind="ggn", iterations=100, method="power",
                                 which="magnitude")
    assert pairs.vectors["0.weight"].shape == (1, 5, 4)
    assert_pairs_match(pairs, dense("mlp", "ggn"), 1, "magnitude", 1e-10, 1e-8)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_eigenpairs_scale_with_the_operator(scale, method):
    matrix = dense("mlp", "ggn")
    expected = torch.linalg.eigvalsh(matrix).flip(0)[:2] * scale
    like = torch.zeros(matrix.shape[0])
    pairs = top_eigenpairs(matrix_mvp(matrix * scale), like, 2, key=KEY, iterations=100, method=method)
    assert torch.all(torch.isfinite(pairs.values)) and torch.all(torch.isfinite(pairs.vectors))
    assert_relative_close(pairs.values, expected, 1e-8)


def test_eigenpairs_are_reproducible_from_the_key():
    matrix = dense("mlp", "hessian")
    like = torch.zeros(matrix.shape[0])
    run = functools.partial(top_eigenpairs, matrix_mvp(matrix), like, 2, iterations=10)
    first, again, other = run(key=KEY), run(key=KEY), run(key=fp.random.fold_in(KEY, 1))
    assert torch.equal(first.values, again.values) and torch.equal(first.vectors, again.vectors)
    assert not torch.equal(first.values, other.values)  # 10 of 43 steps: the start vector matters


# --------------------------------------------------------------------------- Lanczos itself


def test_lanczos_basis_is_orthonormal_and_tridiagonalises():
    matrix = dense("mlp", "hessian")
    _, params, _ = problem("mlp")
    m = 20
    alphas, betas, basis = lanczos(matrix_mvp_tree(matrix, params), random_like(params), m)
    assert list(basis) == list(params) and basis["0.weight"].shape == (m, 5, 4)
    q = stacked_rows(basis, m)  # (m, P)
    t = tridiagonal(alphas, betas)
    assert torch.allclose(q @ q.T, torch.eye(m), atol=1e-12)
    assert torch.allclose(q @ matrix @ q.T, t, atol=1e-12)
    residual = matrix @ q.T - q.T @ t  # C Q - Q T = β_m q_{m+1} e_mᵀ
    assert torch.allclose(residual[:, :-1], torch.zeros(q.shape[1], m - 1), atol=1e-12)
    assert torch.allclose(torch.linalg.vector_norm(residual[:, -1]), betas[-1], atol=1e-12)
    assert torch.all(betas[:-1] > 0)


def matrix_mvp_tree(matrix: torch.Tensor, like):
    """A pytree operator from a dense matrix in ravel order."""
    unravel = ravel(like)[1]
    return lambda tree: unravel(matrix @ ravel(tree)[0])


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_lanczos_restarts_at_invariant_subspaces_without_nan(reorthogonalize):
    """A diagonal matrix with repeated eigenvalues: the Krylov space of ``ones`` has dimension 4
    (the distinct values), so the process breaks down after 4 steps and restarts."""
    diagonal = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 0.5])
    mvp = lambda v: diagonal * v  # noqa: E731
    alphas, betas, basis = lanczos(mvp, torch.ones(8), 8, reorthogonalize=reorthogonalize)
    assert torch.all(torch.isfinite(alphas)) and torch.all(torch.isfinite(betas)) and torch.all(torch.isfinite(basis))
    assert betas[3] == 0  # the breakdown, recorded as a split of T
    if reorthogonalize:
        assert torch.allclose(basis @ basis.T, torch.eye(8), atol=1e-12)
        # T is similar to C: multiplicities are recovered through the restarts.
        assert torch.allclose(torch.linalg.eigvalsh(tridiagonal(alphas, betas)), diagonal.sort().values, atol=1e-12)
    first_block = torch.linalg.eigvalsh(tridiagonal(alphas[:4], betas[:4]))
    assert torch.allclose(first_block, torch.tensor([0.5, 1.0, 2.0, 3.0]), atol=1e-12)
    nodes, weights = lanczos_quadrature(mvp, torch.ones(8), 8)
    expected = {0.5: 1 / 8, 1.0: 2 / 8, 2.0: 2 / 8, 3.0: 3 / 8}  # the spectral measure of ones/√8
    for value, weight in expected.items():
        assert abs(weights[(nodes - value).abs() < 1e-10].sum() - weight) < 1e-12


def test_vmap_of_lanczos_over_starts_with_and_without_breakdown_equals_a_loop():
    """Members that break down (an eigenvector start at once, a start in a 4-dimensional invariant
    subspace after 4 steps, a zero start) next to one that does not, in one batch: the restart's
    mixed path under vmap."""
    diagonal = torch.arange(1.0, 9.0)
    half = torch.cat([torch.ones(4), torch.zeros(4)])
    starts = torch.stack([torch.ones(8), torch.eye(8)[2], half, torch.zeros(8)])
    run = functools.partial(lanczos, lambda v: diagonal * v, iterations=8)
    batched = vmap(lambda start: tuple(run(start)))(starts)
    for index, start in enumerate(starts):
        for got, expected in zip(batched, run(start)):
            assert torch.allclose(got[index], expected, rtol=1e-12, atol=1e-14)
    betas = batched[1]
    assert torch.all(betas[0, :-1] > 1e-3) and betas[1, 0] == 0 and betas[2, 3] == 0 and betas[3, 0] == 0


@pytest.mark.parametrize("case", ["eigenvector_start", "zero_start", "zero_matrix"])
def test_lanczos_degenerate_inputs_stay_finite(case):
    diagonal = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0])
    start = torch.ones(5)
    if case == "eigenvector_start":
        start = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    elif case == "zero_start":
        start = torch.zeros(5)
    else:
        diagonal = torch.zeros(5)
    alphas, betas, basis = lanczos(lambda v: diagonal * v, start, 5)
    assert all(torch.all(torch.isfinite(x)) for x in (alphas, betas, basis))
    assert torch.allclose(basis @ basis.T, torch.eye(5), atol=1e-12)
    assert torch.allclose(torch.linalg.eigvalsh(tridiagonal(alphas, betas)), diagonal.sort().values, atol=1e-12)


# --------------------------------------------------------------------------- Hutchinson


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchinson_trace_is_within_three_standard_errors(distribution):
    md, params, batch = problem("mlp")
    matrix = dense("mlp", "hessian")
    samples = 600
    result = hutchinson_trace(curvature_mvp(md, params, batch), params, key=KEY, samples=samples,
                              distribution=distribution)
    # Each draw is zᵀ C z for the documented probe.
    for index in (0, samples - 1):
        z = ravel(probe_vectors(fp.random.split(KEY, samples)[index], params, distribution))[0]
        assert abs(result.draws[index] - z @ matrix @ z) < 1e-10
    assert result.standard_error > 0
    assert abs(result.estimate - torch.trace(matrix)) <= 3 * result.standard_error, \
        (result.estimate, torch.trace(matrix), result.standard_error)
    variance = 2 * (matrix.square().sum() - (matrix.diagonal().square().sum() if distribution == "rademacher" else 0))
    assert 0.7 < result.standard_error / math.sqrt(variance / samples) < 1.3  # matches the probe's variance


def test_hutchinson_is_exact_for_a_diagonal_with_rademacher_probes():
    diagonal = torch.linspace(-2.0, 5.0, 30)
    result = hutchinson_trace(lambda v: diagonal * v, torch.zeros(30), key=KEY, samples=8)
    assert abs(result.estimate - diagonal.sum()) < 1e-12
    assert result.standard_error < 1e-12


def test_hutchinson_is_keyed_and_vmap_over_keys_equals_a_loop():
    matrix = dense("mlp", "hessian")
    _, params, _ = problem("mlp")
    mvp = matrix_mvp_tree(matrix, params)
    keys = torch.stack([fp.random.fold_in(KEY, i) for i in range(3)])

    def estimate(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        result = hutchinson_trace(mvp, params, key=key, samples=16)
        return result.estimate, result.standard_error

    batched = vmap(estimate)(keys)
    looped = [estimate(key) for key in keys]
    for index, (value, error) in enumerate(looped):
        assert torch.allclose(batched[0][index], value, rtol=1e-12, atol=0)
        assert torch.allclose(batched[1][index], error, rtol=1e-12, atol=0)
    assert torch.equal(estimate(keys[0])[0], looped[0][0])  # same key, same result
    assert len({float(value) for value, _ in looped}) == 3  # different keys, different probes


# --------------------------------------------------------------------------- stochastic Lanczos quadrature


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_quadrature_moments_equal_the_quadratic_forms(kind):
    """``m`` Lanczos steps integrate polynomials of degree ``<= 2m - 1`` exactly: with ``m = 3``,
    ``Σ τ θ^j = vᵀ C^j v / vᵀ v`` for ``j = 0..5``."""
    md, params, batch = problem("mlp")
    matrix = dense("mlp", kind)
    vector = random_like(params)
    nodes, weights = lanczos_quadrature(curvature_mvp(md, params, batch, kind), vector, 3)
    v = ravel(vector)[0]
    for j in range(6):
        expected = v @ torch.linalg.matrix_power(matrix, j) @ v / (v @ v)
        assert abs((weights * nodes**j).sum() - expected) <= 1e-10 * max(1.0, abs(expected.item())), j


@functools.lru_cache(maxsize=None)
def hessian_density(sigma: float = 0.01):
    md, params, batch = problem("mlp")
    return spectral_density(curvature_mvp(md, params, batch), params, key=KEY, probes=48, iterations=43,
                            sigma=sigma)


def test_density_integrates_to_one_and_its_moments_match_the_dense_matrix():
    matrix = dense("mlp", "hessian")
    size = matrix.shape[0]
    result = hessian_density()
    assert abs(torch.trapezoid(result.density, result.grid) - 1) < 1e-12
    assert torch.all(result.density >= 0)
    assert torch.allclose(result.weights.sum(dim=1), torch.ones(48), atol=1e-12)
    # Per probe the quadrature moments estimate tr(C^j)/P; their mean lies within 4 standard errors.
    for j in range(4):
        per_probe = (result.weights * result.nodes**j).sum(dim=1)
        expected = torch.trace(torch.linalg.matrix_power(matrix, j)) / size
        error = per_probe.std(correction=1) / math.sqrt(48)
        assert abs(per_probe.mean() - expected) <= 4 * error + 1e-12, (j, per_probe.mean(), expected, error)
    # With iterations = P the quadrature is exact: every node that carries weight is an eigenvalue.
    eigenvalues = torch.linalg.eigvalsh(matrix)
    carried = result.nodes[result.weights > 1e-10]
    assert (carried[:, None] - eigenvalues[None, :]).abs().min(dim=1).values.max() < 1e-8


def test_density_mass_lies_at_the_dense_eigenvalues():
    eigenvalues = torch.linalg.eigvalsh(dense("mlp", "hessian"))
    result = hessian_density()
    sigma = float(result.sigma)
    assert sigma == 0.01
    distance = (result.grid[:, None] - eigenvalues[None, :]).abs().min(dim=1).values
    near = distance <= 5 * sigma
    assert torch.trapezoid(result.density * near, result.grid) > 1 - 1e-5
    assert result.density[distance > 6 * sigma].max() < 1e-6 * result.density.max()
    # The default grid covers the spectrum with a 5σ margin.
    assert result.grid[0] < eigenvalues[0] - 4.9 * sigma and result.grid[-1] > eigenvalues[-1] + 4.9 * sigma


def test_density_of_a_rank_deficient_ggn_puts_the_null_space_mass_at_zero():
    md, params, batch = problem("mlp")
    matrix = dense("mlp", "ggn")
    eigenvalues = torch.linalg.eigvalsh(matrix)
    null_fraction = float((eigenvalues.abs() < 1e-12).double().mean())
    assert 0.5 < null_fraction < 1  # 4 examples x 2 logit directions: rank 8 of 43
    result = spectral_density(curvature_mvp(md, params, batch, "ggn"), params, key=KEY, probes=32, iterations=43)
    assert all(torch.all(torch.isfinite(x)) for x in result)
    at_zero = (result.weights * (result.nodes.abs() < 1e-10)).sum(dim=1)  # per probe
    error = at_zero.std(correction=1) / math.sqrt(32)
    assert abs(at_zero.mean() - null_fraction) <= 4 * error
    assert float(result.sigma) == pytest.approx(math.sqrt(1e-5))  # default: σ² = 1e-5 · max(1, range)


def test_density_is_keyed_and_vmap_over_keys_equals_a_loop():
    matrix = dense("mlp", "ggn")
    like = torch.zeros(matrix.shape[0])
    keys = torch.stack([fp.random.fold_in(KEY, i) for i in range(3)])
    grid = torch.linspace(-0.1, 0.7, 200)

    def density(key: torch.Tensor) -> torch.Tensor:
        return spectral_density(matrix_mvp(matrix), like, key=key, probes=4, iterations=6, grid=grid,
                                sigma=0.02).density

    batched = vmap(density)(keys)
    looped = torch.stack([density(key) for key in keys])
    assert torch.allclose(batched, looped, rtol=1e-10, atol=1e-12)
    assert torch.equal(density(keys[0]), looped[0])
    assert not torch.allclose(looped[0], looped[1])


# --------------------------------------------------------------------------- validation


def _operator():
    matrix = dense("mlp", "ggn")
    return matrix_mvp(matrix), torch.zeros(matrix.shape[0])


@pytest.mark.parametrize("call,error,match", [
    (lambda m, x: lanczos(m, x, 0), ValueError, "iterations"),
    (lambda m, x: lanczos(m, x, 44), ValueError, "iterations"),
    (lambda m, x: lanczos(m, x, 2.0), TypeError, "iterations"),
    (lambda m, x: top_eigenpairs(m, x, 0, key=KEY), ValueError, "k"),
    (lambda m, x: top_eigenpairs(m, x, 5, key=KEY, iterations=4), ValueError, "k"),
    (lambda m, x: top_eigenpairs(m, x, 1, key=KEY, method="arnoldi"), ValueError, "method"),
    (lambda m, x: top_eigenpairs(m, x, 1, key=KEY, which="smallest"), ValueError, "which"),
    (lambda m, x: top_eigenpairs(m, x, 1, key=3), TypeError, "key"),
    (lambda m, x: hutchinson_trace(m, x, key=KEY, samples=1), ValueError, "samples"),
    (lambda m, x: hutchinson_trace(m, x, key=KEY, distribution="uniform"), ValueError, "distribution"),
    (lambda m, x: spectral_density(m, x, key=KEY, sigma=0.0), ValueError, "sigma"),
    (lambda m, x: spectral_density(m, x, key=KEY, probes=0), ValueError, "probes"),
    (lambda m, x: spectral_density(m, x, key=KEY, grid=torch.zeros(1)), ValueError, "grid"),
    (lambda m, x: lanczos(m, {}, 2), ValueError, "no leaves"),
])
def test_bad_arguments_raise_early_naming_them(call, error, match):
    mvp, like = _operator()
    with pytest.raises(error, match=match):
        call(mvp, like)


def test_curvature_mvp_rejects_unknown_kinds_and_foreign_params():
    md, params, batch = problem("mlp")
    with pytest.raises(ValueError, match="kind"):
        curvature_mvp(md, params, batch, "fisher_mc")
    with pytest.raises(ValueError, match="params"):
        curvature_mvp(md, {"0.weight": params["0.weight"]}, batch)
