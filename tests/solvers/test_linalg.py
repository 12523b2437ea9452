"""fprecond.solvers.linalg against torch.linalg on SPD, ill-conditioned, singular,
indefinite and zero matrices, batched, under vmap, in float32 and float64."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch.func import vmap

from fprecond.solvers.cg import CGInfo, conjugate_gradient
from fprecond.solvers.linalg import (
    damped_cholesky_inverse,
    damped_eigh,
    eigh_power,
    gram_woodbury,
    inverse_root_newton,
    newton_schulz_inverse,
    orthogonalize,
    woodbury_solve,
)
from tests.helpers import assert_relative_close

N = 8  # 8 float64 = 64 bytes per row: every matrix of a batch is equally aligned (see the bitwise test)
KINDS = ("spd", "ill", "singular", "indefinite", "zero")


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def spectral(values: torch.Tensor, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Q diag(values) Qᵀ`` for a fixed random orthogonal ``Q`` (exact eigenvectors)."""
    q = _orthogonal(values.shape[-1], seed)
    return ((q * values.to(torch.float64)) @ q.T).to(dtype)


def conditioned(cond: float, n: int = N) -> torch.Tensor:
    """Eigenvalues log-spaced from 1 down to ``1/cond``."""
    return torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)


def make(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    if kind == "spd":
        return spectral(conditioned(10.0, n), seed, dtype)
    if kind == "ill":
        return spectral(conditioned(1e10 if dtype == torch.float64 else 1e7, n), seed, dtype)
    if kind == "singular":
        factor = torch.randn(n, n // 2, generator=g, dtype=torch.float64)
        return (factor @ factor.T).to(dtype)
    if kind == "indefinite":
        return spectral(torch.linspace(-2.0, 3.0, n, dtype=torch.float64), seed, dtype)
    return torch.zeros(n, n, dtype=dtype)


def exact_power(values: torch.Tensor, exponent: float, seed: int = 0) -> torch.Tensor:
    return spectral(values.pow(exponent), seed)


def dense_matvec(matrix: torch.Tensor, shapes: dict[str, tuple[int, ...]]):
    """A ``matvec`` on ``{name: tensor}`` trees from a dense matrix on the raveled vector."""
    def matvec(tree):
        flat = torch.cat([tree[name].reshape(-1) for name in shapes])
        out = matrix @ flat
        pieces = torch.split(out, [math.prod(shape) for shape in shapes.values()])
        return {name: piece.reshape(shape) for piece, (name, shape) in zip(pieces, shapes.items())}
    return matvec


SHAPES = {"weight": (2, 3), "bias": (2,)}


def as_tree(vector: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight": vector[:6].reshape(2, 3), "bias": vector[6:]}


def from_tree(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tree["weight"].reshape(-1), tree["bias"]])


# --------------------------------------------------------------------------- damped_cholesky_inverse


@pytest.mark.parametrize("dtype,cond,damping,tol", [
    (torch.float64, 1e1, 0.0, 1e-14),
    (torch.float64, 1e4, 0.0, 1e-11),
    (torch.float64, 1e8, 0.0, 1e-7),
    (torch.float64, 1e12, 0.0, 1e-3),
    (torch.float64, 1e12, 1e-3, 1e-12),
    (torch.float32, 1e1, 0.0, 1e-6),
    (torch.float32, 1e4, 0.0, 1e-2),
])
def test_cholesky_inverse_matches_exact_inverse(dtype, cond, damping, tol):
    values = conditioned(cond)
    inverse, failures = damped_cholesky_inverse(spectral(values, dtype=dtype), damping)
    assert inverse.dtype == dtype and failures.dtype == torch.int64 and failures.shape == ()
    assert failures.item() == 0
    assert_relative_close(inverse.double(), exact_power(values + damping, -1.0), tol)
    if dtype == torch.float64:  # as accurate as torch.linalg.inv
        reference = torch.linalg.inv(spectral(values) + damping * torch.eye(N))
        assert_relative_close(inverse, reference, tol)


def test_cholesky_inverse_indefinite_falls_back_to_clamped_eigh():
    matrix = make("indefinite")  # eigenvalues in [-2, 3]: 1e-3·10^k never makes it definite
    inverse, failures = damped_cholesky_inverse(matrix, 1e-3, retries=3)
    assert failures.item() == 4
    values, vectors = torch.linalg.eigh(matrix)
    expected = (vectors / (values.clamp_min(0) + 1e-3)) @ vectors.T
    assert_relative_close(inverse, expected, 1e-13)
    assert torch.equal(inverse, eigh_power(matrix, -1.0, 1e-3))


def test_cholesky_inverse_retry_with_grown_damping():
    values = torch.linspace(-0.05, 1.0, N, dtype=torch.float64)  # damping 0.01 fails, 0.1 succeeds
    inverse, failures = damped_cholesky_inverse(spectral(values), 0.01, growth=10.0)
    assert failures.item() == 1
    assert_relative_close(inverse, exact_power(values + 0.1, -1.0), 1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_inverse_singular_and_zero_use_the_floor(dtype):
    singular = make("singular", dtype)
    inverse, failures = damped_cholesky_inverse(singular, 0.0)
    assert torch.isfinite(inverse).all() and failures.item() == 4
    values, vectors = torch.linalg.eigh(singular)
    floor = torch.finfo(dtype).eps * N * values.abs().max()
    expected = (vectors / values.clamp_min(0).clamp_min(floor)) @ vectors.T
    assert_relative_close(inverse, expected, 1e-5 if dtype == torch.float32 else 1e-12)
    zero_inverse, zero_failures = damped_cholesky_inverse(torch.zeros(N, N, dtype=dtype), 0.0)
    assert torch.isfinite(zero_inverse).all() and zero_failures.item() == 4
    assert torch.equal(zero_inverse, zero_inverse.diagonal()[0] * torch.eye(N, dtype=dtype))
    damped_zero, damped_failures = damped_cholesky_inverse(torch.zeros(N, N, dtype=dtype), 0.5)
    assert damped_failures.item() == 0 and torch.allclose(damped_zero, 2 * torch.eye(N, dtype=dtype))


def test_cholesky_inverse_tensor_damping_per_member_and_validation():
    batch = torch.stack([make("spd", seed=s) for s in range(3)])
    damping = torch.tensor([0.0, 0.1, 1.0])
    inverse, failures = damped_cholesky_inverse(batch, damping)
    for i in range(3):
        single, _ = damped_cholesky_inverse(batch[i], float(damping[i]))
        torch.testing.assert_close(inverse[i], single, rtol=1e-14, atol=0)
    assert failures.shape == (3,)
    with pytest.raises(ValueError, match="damping"):
        damped_cholesky_inverse(batch, -1.0)
    with pytest.raises(ValueError, match="growth"):
        damped_cholesky_inverse(batch, 0.1, growth=1.0)
    with pytest.raises(ValueError, match="retries"):
        damped_cholesky_inverse(batch, 0.1, retries=-1)


def test_cholesky_inverse_failing_member_does_not_change_the_others():
    good = torch.stack([make("spd", seed=0), make("spd", seed=1), make("ill", seed=2)])
    mixed = good.clone()
    mixed[1] = make("indefinite", seed=1)
    damping = torch.tensor([1e-3, 1e-3, 1e-3])
    for fn in (damped_cholesky_inverse, vmap(damped_cholesky_inverse)):
        good_inverse, good_failures = fn(good, damping)
        mixed_inverse, mixed_failures = fn(mixed, damping)
        assert good_failures.tolist() == [0, 0, 0] and mixed_failures.tolist() == [0, 4, 0]
        for i in (0, 2):
            assert torch.equal(mixed_inverse[i], good_inverse[i])
            # Against each member alone: bitwise too, since every N×N float64 member is
            # 64-byte aligned (MKL's potri rounds differently at other alignments).
            assert torch.equal(mixed_inverse[i], damped_cholesky_inverse(mixed[i], 1e-3)[0])
        torch.testing.assert_close(mixed_inverse[1], damped_cholesky_inverse(mixed[1], 1e-3)[0],
                                   rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind,cholesky_calls,eigh_calls", [
    ("spd", 1, 0),         # nothing fails: no retry, no eigh
    ("indefinite", 4, 1),  # every retry and the fallback
    ("singular", 1, 1),    # damping 0: a retry would repeat the same failure, skipped
])
@pytest.mark.parametrize("use_vmap", [False, True])
def test_cholesky_inverse_skips_unneeded_retries(kind, cholesky_calls, eigh_calls, use_vmap):
    batch = torch.stack([make(kind, seed=s) for s in range(3)])
    damping = 0.0 if kind == "singular" else 1e-3
    fn = vmap(lambda m: damped_cholesky_inverse(m, damping)) if use_vmap else (
        lambda m: damped_cholesky_inverse(m, damping))
    with mock.patch.object(torch.linalg, "cholesky_ex", wraps=torch.linalg.cholesky_ex) as cholesky, \
            mock.patch.object(torch.linalg, "eigh", wraps=torch.linalg.eigh) as eigh:
        inverse, _ = fn(batch)
    assert (cholesky.call_count, eigh.call_count) == (cholesky_calls, eigh_calls)
    assert torch.isfinite(inverse).all()


# --------------------------------------------------------------------------- eigh


@pytest.mark.parametrize("eigenvalues", ["clamp", "abs"])
def test_damped_eigh_matches_modified_spectrum(eigenvalues):
    matrix = make("indefinite")
    values, vectors = damped_eigh(matrix, 0.1, eigenvalues=eigenvalues)
    reference = torch.linalg.eigvalsh(matrix)
    modified = reference.clamp_min(0) if eigenvalues == "clamp" else reference.abs()
    torch.testing.assert_close(values, modified + 0.1, rtol=1e-13, atol=1e-13)
    rebuilt = (vectors * values) @ vectors.T
    if eigenvalues == "abs":  # |A| = (A²)^½, a check independent of eigh's vectors
        torch.testing.assert_close(rebuilt @ rebuilt, (matrix @ matrix) + 0.2 * rebuilt - 0.01 * torch.eye(N))
    with pytest.raises(ValueError, match="eigenvalues"):
        damped_eigh(matrix, 0.1, eigenvalues="square")


@pytest.mark.parametrize("exponent", [-1.0, -0.5, -0.25, 0.5, 2.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_eigh_power_matches_exact_power(exponent, dtype, tol):
    values = conditioned(100.0)
    result = eigh_power(spectral(values, dtype=dtype), exponent, 0.01)
    assert_relative_close(result.double(), exact_power(values + 0.01, exponent), tol)
    if exponent == -1.0 and dtype == torch.float64:
        assert_relative_close(result, torch.linalg.inv(spectral(values) + 0.01 * torch.eye(N)), tol)
    if exponent == 2.0 and dtype == torch.float64:
        shifted = spectral(values) + 0.01 * torch.eye(N)
        assert_relative_close(result, shifted @ shifted, tol)


def test_eigh_power_abs_and_floor():
    indefinite = make("indefinite")
    assert_relative_close(eigh_power(indefinite, 2.0, eigenvalues="abs"), indefinite @ indefinite, 1e-13)
    assert_relative_close(eigh_power(indefinite, -1.0, eigenvalues="abs") @ eigh_power(indefinite, 1.0, eigenvalues="abs"),
                          torch.eye(N), 1e-13)
    singular = make("singular")
    root = eigh_power(singular, -0.25)
    floor = torch.finfo(torch.float64).eps * N * torch.linalg.eigvalsh(singular).abs().max()
    assert torch.isfinite(root).all() and root.diagonal().max() <= 1.01 * floor ** -0.25
    for exponent in (-0.25, -1.0, -4.0):
        assert torch.isfinite(eigh_power(torch.zeros(N, N), exponent)).all()


# --------------------------------------------------------------------------- Newton iterations


@pytest.mark.parametrize("root", [1, 2, 4])
@pytest.mark.parametrize("dtype,cond,tol", [
    (torch.float64, 1e2, 1e-13),
    (torch.float64, 1e6, 1e-9),
    (torch.float64, 1e12, 1e-4),
    (torch.float32, 1e2, 1e-5),
    (torch.float32, 1e4, 1e-3),
])
def test_inverse_root_newton_matches_eigh_power(root, dtype, cond, tol):
    values = conditioned(cond)
    matrix = spectral(values, dtype=dtype)
    result = inverse_root_newton(matrix, root)
    assert result.dtype == dtype
    expected = exact_power(values, -1.0 / root)
    assert_relative_close(result.double(), expected, tol)
    assert_relative_close(eigh_power(matrix, -1.0 / root).double(), expected, tol)


def test_inverse_root_newton_damping_and_freezing():
    values = conditioned(1e3)
    matrix = spectral(values)
    damping = torch.tensor(0.05)
    result = inverse_root_newton(matrix, 4, damping)
    assert_relative_close(result, exact_power(values + 0.05, -0.25), 1e-13)
    # Converged members stop updating: more iterations change no bit.
    assert torch.equal(inverse_root_newton(matrix, 4, damping, iterations=80), result)
    with pytest.raises(ValueError, match="root"):
        inverse_root_newton(matrix, 0)


@pytest.mark.parametrize("dtype,cond,tol", [
    (torch.float64, 1e1, 1e-14), (torch.float64, 1e4, 1e-11), (torch.float64, 1e6, 1e-9),
    (torch.float32, 1e1, 1e-6), (torch.float32, 1e3, 1e-3),
])
def test_newton_schulz_inverse_matches_inv(dtype, cond, tol):
    values = conditioned(cond)
    result = newton_schulz_inverse(spectral(values, dtype=dtype))
    assert_relative_close(result.double(), exact_power(values, -1.0), tol)


def test_newton_schulz_inverse_indefinite_nonsymmetric_singular():
    indefinite = make("indefinite")
    assert_relative_close(newton_schulz_inverse(indefinite, 0.1), torch.linalg.inv(indefinite + 0.1 * torch.eye(N)),
                          1e-12)
    general = torch.randn(N, N, generator=torch.Generator().manual_seed(5)) + 3 * torch.eye(N)
    assert_relative_close(newton_schulz_inverse(general, iterations=80), torch.linalg.inv(general), 1e-12)
    blocks = torch.block_diag(make("spd", n=4), torch.zeros(4, 4))  # an exactly held null space
    assert_relative_close(newton_schulz_inverse(blocks), torch.linalg.pinv(blocks), 1e-12)
    assert torch.equal(newton_schulz_inverse(torch.zeros(N, N)), torch.zeros(N, N))
    assert torch.isfinite(newton_schulz_inverse(make("singular"), iterations=300)).all()


# --------------------------------------------------------------------------- orthogonalize


@pytest.mark.parametrize("shape", [(6, 12), (12, 6), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonalize_quintic_band_and_cubic_polar_factor(shape, dtype):
    g = torch.Generator().manual_seed(7)
    gradient = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    u, s, vh = torch.linalg.svd(gradient.double(), full_matrices=False)
    quintic = orthogonalize(gradient)
    assert quintic.shape == shape and quintic.dtype == dtype
    singular_values = torch.linalg.svdvals(quintic.double())
    assert singular_values.min() > 0.6 and singular_values.max() < 1.2, singular_values
    # The singular vectors are kept: Uᵀ O V is diagonal.
    core = u.T @ quintic.double() @ vh.T
    assert (core - torch.diag(core.diagonal())).abs().max() < (1e-4 if dtype == torch.float32 else 1e-12)
    # Singular values of this matrix are >= 0.05 of the largest: 40 cubic steps converge.
    well = (u * torch.linspace(1.0, 0.05, min(shape), dtype=torch.float64)) @ vh
    cubic = orthogonalize(well.to(dtype), steps=40, coefficients="cubic")
    assert_relative_close(cubic.double(), u @ vh, 1e-5 if dtype == torch.float32 else 1e-13)


def test_orthogonalize_zero_custom_and_validation():
    assert torch.equal(orthogonalize(torch.zeros(2, 4, 6)), torch.zeros(2, 4, 6))
    gradient = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(orthogonalize(gradient, steps=40, coefficients=(1.5, -0.5)),
                               orthogonalize(gradient, steps=40, coefficients="cubic"))
    with pytest.raises(ValueError, match="coefficients"):
        orthogonalize(gradient, coefficients="septic")
    with pytest.raises(ValueError, match="coefficients"):
        orthogonalize(gradient, coefficients=(1.0,))


# --------------------------------------------------------------------------- Woodbury


@pytest.mark.parametrize("rank,size", [(3, 10), (10, 4), (6, 6)])
@pytest.mark.parametrize("damping", [0.1, 1.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-3)])
def test_woodbury_matches_dense_solve(rank, size, damping, dtype, tol):
    g = torch.Generator().manual_seed(rank * size)
    vectors = torch.randn(2, rank, size, generator=g, dtype=torch.float64)
    rhs = torch.randn(2, size, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve(damping * torch.eye(size) + vectors.mT @ vectors, rhs)
    result = woodbury_solve(vectors.to(dtype), rhs.to(dtype), damping)
    assert result.dtype == dtype
    assert_relative_close(result.double(), expected, tol)
    inner = gram_woodbury((vectors @ vectors.mT).to(dtype), (vectors @ rhs[..., None])[..., 0].to(dtype), damping)
    assert_relative_close(inner.double(), torch.linalg.solve(damping * torch.eye(rank) + vectors @ vectors.mT,
                                                             (vectors @ rhs[..., None])[..., 0]), tol)


def test_woodbury_tensor_damping_and_validation():
    g = torch.Generator().manual_seed(0)
    vectors, rhs = torch.randn(3, 4, 9, generator=g), torch.randn(3, 9, generator=g)
    damping = torch.tensor([0.1, 1.0, 10.0])
    result = woodbury_solve(vectors, rhs, damping)
    for i in range(3):
        expected = torch.linalg.solve(damping[i] * torch.eye(9) + vectors[i].T @ vectors[i], rhs[i])
        assert_relative_close(result[i], expected, 1e-12)
    with pytest.raises(ValueError, match="damping"):
        woodbury_solve(vectors, rhs, 0.0)


# --------------------------------------------------------------------------- conjugate gradient


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cg_solves_spd_within_n_iterations(dtype, tol):
    matrix = spectral(conditioned(10.0), seed=3, dtype=dtype)
    rhs = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    x, info = conjugate_gradient(dense_matvec(matrix, SHAPES), as_tree(rhs), iterations=N,
                                 tol=1e-10 if dtype == torch.float64 else 1e-5)
    assert isinstance(info, CGInfo) and info.iterations.dtype == torch.int64
    expected = torch.linalg.solve(matrix.double(), rhs.double())
    assert_relative_close(from_tree(x).double(), expected, tol)
    assert 1 <= info.iterations.item() <= N and not info.negative_curvature.item()
    true_residual = torch.linalg.vector_norm(rhs - matrix @ from_tree(x)) / torch.linalg.vector_norm(rhs)
    assert info.residual.item() <= (1e-10 if dtype == torch.float64 else 1e-5)
    assert abs(info.residual.item() - true_residual.item()) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_cg_masks_after_convergence_and_skips_matvecs():
    matrix = spectral(conditioned(10.0), seed=3)
    rhs = as_tree(torch.randn(N, generator=torch.Generator().manual_seed(2)))
    calls = {"count": 0}
    matvec = dense_matvec(matrix, SHAPES)

    def counting(vector):
        calls["count"] += 1
        return matvec(vector)

    short, short_info = conjugate_gradient(counting, rhs, iterations=N)
    calls["count"] = 0
    long, long_info = conjugate_gradient(counting, rhs, iterations=5 * N)
    assert calls["count"] == long_info.iterations.item()  # no matvec once converged
    for name in SHAPES:
        assert torch.equal(short[name], long[name])
    assert torch.equal(short_info.iterations, long_info.iterations)


def test_cg_with_exact_preconditioner_and_x0():
    matrix = spectral(conditioned(1e4), seed=4)
    rhs = torch.randn(N, generator=torch.Generator().manual_seed(1))
    inverse = torch.linalg.inv(matrix)
    x, info = conjugate_gradient(dense_matvec(matrix, SHAPES), as_tree(rhs), iterations=N,
                                 preconditioner=dense_matvec(inverse, SHAPES))
    assert info.iterations.item() == 1
    assert_relative_close(from_tree(x), torch.linalg.solve(matrix, rhs), 1e-10)
    start = torch.linalg.solve(matrix, rhs) + 1e-3
    x, info = conjugate_gradient(dense_matvec(matrix, SHAPES), as_tree(rhs), x0=as_tree(start), iterations=3 * N)
    assert_relative_close(from_tree(x), torch.linalg.solve(matrix, rhs), 1e-9)


def test_cg_negative_curvature_and_zero_rhs():
    rhs = as_tree(torch.randn(N, generator=torch.Generator().manual_seed(1)))
    indefinite = make("indefinite")
    x, info = conjugate_gradient(dense_matvec(indefinite, SHAPES), rhs, iterations=N)
    assert info.negative_curvature.item() and torch.isfinite(from_tree(x)).all()
    # It stopped before the bad direction: the same x as a run with exactly that many steps.
    steps = int(info.iterations)
    x_before, _ = conjugate_gradient(dense_matvec(indefinite, SHAPES), rhs, iterations=steps)
    assert torch.equal(from_tree(x), from_tree(x_before))
    x, info = conjugate_gradient(dense_matvec(-make("spd"), SHAPES), rhs, iterations=N)
    assert torch.equal(from_tree(x), torch.zeros(N)) and info.iterations.item() == 0 and info.negative_curvature
    zero = as_tree(torch.zeros(N))
    x, info = conjugate_gradient(dense_matvec(make("spd"), SHAPES), zero, iterations=N)
    assert torch.equal(from_tree(x), torch.zeros(N))
    assert (info.iterations.item(), info.residual.item(), info.negative_curvature.item()) == (0, 0.0, False)


def test_cg_vmap_equals_loop():
    matrices = torch.stack([make("spd", seed=0), make("indefinite", seed=1), make("ill", seed=2) + torch.eye(N)])
    rhs = torch.randn(3, N, generator=torch.Generator().manual_seed(3))

    def solve(matrix, vector):
        x, info = conjugate_gradient(lambda v: {"v": matrix @ v["v"]}, {"v": vector}, iterations=2 * N)
        return x["v"], info

    xs, infos = vmap(solve)(matrices, rhs)
    nested, nested_infos = vmap(vmap(solve))(matrices[None].expand(2, -1, -1, -1), rhs[None].expand(2, -1, -1))
    for i in range(3):
        x, info = solve(matrices[i], rhs[i])
        torch.testing.assert_close(xs[i], x, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(nested[1, i], x, rtol=1e-10, atol=1e-12)
        assert infos.iterations[i] == info.iterations == nested_infos.iterations[1, i]
        assert infos.negative_curvature[i] == info.negative_curvature


# --------------------------------------------------------------------------- all functions: batching and finiteness


FUNCTIONS = {
    "cholesky_inverse": lambda m: damped_cholesky_inverse(m, 1e-3)[0],
    "cholesky_inverse_undamped": lambda m: damped_cholesky_inverse(m, 0.0)[0],
    "damped_eigh": lambda m: damped_eigh(m, 1e-3, eigenvalues="abs")[0],
    "eigh_power_root": lambda m: eigh_power(m, -0.25),
    "inverse_root_newton": lambda m: inverse_root_newton(m, 4, 1e-3),
    "inverse_root_newton_undamped": lambda m: inverse_root_newton(m, 2),
    "newton_schulz_inverse": lambda m: newton_schulz_inverse(m),
    "orthogonalize": lambda m: orthogonalize(m[:, : N // 2]),
    "woodbury_solve": lambda m: woodbury_solve(m[: N // 2], m[0], 1e-3),
    "conjugate_gradient": lambda m: from_tree(conjugate_gradient(dense_matvec(m, SHAPES),
                                                                 as_tree(torch.ones(N, dtype=m.dtype)))[0]),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_on_every_kind(name, dtype):
    batch = torch.stack([make(kind, dtype) for kind in KINDS])
    result = FUNCTIONS[name](batch) if name not in ("woodbury_solve", "conjugate_gradient", "orthogonalize") \
        else vmap(FUNCTIONS[name])(batch)
    assert torch.isfinite(result).all(), name


@pytest.mark.parametrize("name", [name for name in FUNCTIONS if name != "conjugate_gradient"])
def test_vmap_and_nested_vmap_equal_loop(name):  # CG on singular input amplifies rounding: see test_cg_vmap
    fn = FUNCTIONS[name]
    batch = torch.stack([make(kind, seed=s) for s, kind in enumerate(KINDS)])
    loop = torch.stack([fn(matrix) for matrix in batch])
    torch.testing.assert_close(vmap(fn)(batch), loop, rtol=1e-10, atol=1e-10 * loop.abs().max().item())
    nested = vmap(vmap(fn))(torch.stack([batch[:2], batch[2:4]]))
    torch.testing.assert_close(nested.flatten(0, 1), loop[:4], rtol=1e-10, atol=1e-10 * loop.abs().max().item())


def test_cholesky_inverse_overflow_in_float32_is_a_failure():
    """A tiny positive pivot factorises but its inverse overflows float32: detected from the
    diagonal (an SPD inverse's largest entries), then the eigh fallback keeps it finite."""
    matrix = torch.diag(torch.tensor([1.0, 1e-40], dtype=torch.float32))
    inverse, failures = damped_cholesky_inverse(matrix, 0.0)
    assert int(failures) > 0
    assert torch.isfinite(inverse).all()
    assert inverse[0, 0] == pytest.approx(1.0)
