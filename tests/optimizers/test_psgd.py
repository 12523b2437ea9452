"""PSGD (Li 2018, 2019): the Lie-group fits against their written formulas (dense float64 with
``torch.linalg.inv``, not the triangular solves), the preconditioned gradient, convergence to
``H⁻¹`` on a quadratic, the Hessian-vector pairs, the schedules, numerics, vmap and digits."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import fprecond as fp
from fprecond.optimizers._psgd_factors import (
    dense_factor_update,
    dense_precondition,
    kron_factor_update,
    kron_precondition,
    KronFactors,
    matrix_shape,
)
from fprecond.optimizers.psgd import psgd, psgd_pair, scale_by_psgd
from fprecond.tree import ravel, tree_leaves, tree_map

from tests.helpers import assert_ensemble_matches_loop, assert_relative_close, dense_hessian, make_problem, train_digits

psgd_module = importlib.import_module("fprecond.optimizers.psgd")  # the module, not the recipe it exports

TINY = torch.finfo(torch.float64).tiny
TOL = 1e-10


def upper_factor(n: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A random upper-triangular matrix with a positive diagonal (a valid ``Q``)."""
    q = torch.triu(0.3 * torch.randn(n, n, generator=g)) + torch.diag(1.0 + torch.rand(n, generator=g))
    return scale * q


def as_matrix(factor: torch.Tensor) -> torch.Tensor:
    """A factor as a dense matrix (diagonal factors are stored as vectors)."""
    return factor if factor.dim() == 2 else torch.diag(factor)


# --------------------------------------------------------------------------- written formulas, float64


def reference_dense_step(q: torch.Tensor, v: torch.Tensor, h: torch.Tensor, lr: float) -> torch.Tensor:
    """``Q - μ triu(a aᵀ - b bᵀ) Q``, ``a = Q h``, ``b = Q⁻ᵀ v``, ``μ = lr / (max|∇| + tiny)``."""
    a = q @ h
    b = torch.linalg.inv(q).T @ v
    gradient = torch.triu(torch.outer(a, a) - torch.outer(b, b))
    return q - lr / (gradient.abs().max() + TINY) * gradient @ q


def reference_kron_step(left: torch.Tensor, right: torch.Tensor, dx: torch.Tensor, dg: torch.Tensor,
                        lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """psgd_torch's ``update_precond_kron`` as dense matrices; a diagonal factor (1-D) takes the
    diagonal of its side's gradient, as ``_update_precond_dense_scale``."""
    dense_left, dense_right = left.dim() == 2, right.dim() == 2
    l, r = as_matrix(left), as_matrix(right)
    rho = torch.sqrt(torch.diagonal(l).max() / torch.diagonal(r).max())
    l, r = l / rho, r * rho
    a = l @ dg @ r.T
    b = torch.linalg.inv(l).T @ dx @ torch.linalg.inv(r)
    grad_l, grad_r = a @ a.T - b @ b.T, a.T @ a - b.T @ b
    grad_l = torch.triu(grad_l) if dense_left else torch.diag(torch.diagonal(grad_l))
    grad_r = torch.triu(grad_r) if dense_right else torch.diag(torch.diagonal(grad_r))
    new_l = l - lr / (grad_l.abs().max() + TINY) * grad_l @ l
    new_r = r - lr / (grad_r.abs().max() + TINY) * grad_r @ r
    # fprecond keeps a side of size 1 (a pure scale the other factor carries): the right one,
    # or the left one when only it has size 1.
    if len(r) == 1:
        return new_l, r
    if len(l) == 1:
        return l, new_r
    return new_l, new_r


def test_dense_fit_is_the_written_formula():
    g = torch.Generator().manual_seed(0)
    q, v, h = upper_factor(6, g), torch.randn(6, generator=g), torch.randn(6, generator=g)
    for lr in (0.01, 0.3):
        assert_relative_close(dense_factor_update(q, v, h, lr), reference_dense_step(q, v, h, lr), TOL)


@pytest.mark.parametrize("left_dense,right_dense", [(True, True), (True, False), (False, True), (False, False)])
def test_kron_fit_is_the_reference_two_factor_update(left_dense, right_dense):
    g = torch.Generator().manual_seed(1)
    m, n = 4, 3
    # Unequal scales, so the ρ balancing changes the factors.
    left = upper_factor(m, g, 3.0) if left_dense else 3.0 * (1.0 + torch.rand(m, generator=g))
    right = upper_factor(n, g, 0.5) if right_dense else 0.5 * (1.0 + torch.rand(n, generator=g))
    dx, dg = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    new = kron_factor_update(KronFactors(left, right), dx, dg, 0.05)
    expected_l, expected_r = reference_kron_step(left, right, dx, dg, 0.05)
    assert new.left.dim() == left.dim() and new.right.dim() == right.dim()
    assert_relative_close(as_matrix(new.left), expected_l, TOL)
    assert_relative_close(as_matrix(new.right), expected_r, TOL)
    # The Kronecker product is unchanged by the balancing alone: the fit is what moved it.
    before = torch.kron(as_matrix(right).T @ as_matrix(right), as_matrix(left).T @ as_matrix(left))
    after = torch.kron(expected_r.T @ expected_r, expected_l.T @ expected_l)
    assert (after - before).norm() > 1e-3 * before.norm()


@pytest.mark.parametrize("left_dense,right_dense", [(True, True), (True, False), (False, True), (False, False)])
def test_preconditioned_gradient_is_qtq_times_g(left_dense, right_dense):
    g = torch.Generator().manual_seed(2)
    q, flat = upper_factor(5, g), torch.randn(5, generator=g)
    assert_relative_close(dense_precondition(q, flat), (q.T @ q) @ flat, TOL)
    left = upper_factor(4, g) if left_dense else 1.0 + torch.rand(4, generator=g)
    right = upper_factor(3, g) if right_dense else 1.0 + torch.rand(3, generator=g)
    gradient = torch.randn(4, 3, generator=g)
    l, r = as_matrix(left), as_matrix(right)
    # Row-major vec: vec(L G R) = (L ⊗ Rᵀ) vec(G), so P = (Q_lᵀQ_l) ⊗ (Q_rᵀQ_r) here.
    expected = (torch.kron(l.T @ l, r.T @ r) @ gradient.reshape(-1)).reshape(4, 3)
    assert_relative_close(kron_precondition(KronFactors(left, right), gradient), expected, TOL)


def test_matrix_shapes_follow_asdl():
    assert matrix_shape((3, 2, 3, 3)) == (3, 18)  # conv kernel (O, C·kh·kw)
    assert matrix_shape((5, 4)) == (5, 4)
    assert matrix_shape((7,)) == (7, 1)
    assert matrix_shape(()) == (1, 1)


# --------------------------------------------------------------------------- the transform, first step


def pair_key(key: torch.Tensor, count: int) -> torch.Tensor:
    """The key of the step's ``v``: ``split(fold_in(key, count))[1]``."""
    return fp.random.split(fp.random.fold_in(key, count))[1]


def expected_v(params, key: torch.Tensor, count: int):
    """``v`` leaf ``i`` from ``fold_in(pair_key, i)`` in ``named_parameters`` order."""
    k = pair_key(key, count)
    return {name: fp.random.normal(fp.random.fold_in(k, i), tuple(p.shape), dtype=p.dtype)
            for i, (name, p) in enumerate(params.items())}


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_hvp_pairs_equal_dense_hessian_times_v(case):
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    key = fp.random.key(3)
    _, grads = fp.loss_and_grads(md, params, batch)
    v, h = psgd_pair(grads, pair_key(key, 0), curvature="hvp", model=md, params=params, batch=batch)
    for name, value in expected_v(params, key, 0).items():
        assert torch.equal(v[name], value)
    assert_relative_close(ravel(h)[0], dense_hessian(md, params, batch) @ ravel(v)[0], 1e-10)
    v_white, h_white = psgd_pair(grads, pair_key(key, 0), curvature="whitening")
    assert h_white is grads and torch.equal(ravel(v_white)[0], ravel(v)[0])


def first_scale(v: torch.Tensor, h: torch.Tensor, whitening: bool) -> torch.Tensor:
    """Li's on-the-fly ``(vᵀv / hᵀh)^(1/4)`` (``vᵀv → numel`` for whitening)."""
    vv = torch.tensor(float(v.numel())) if whitening else v @ v
    return (vv / (h @ h)) ** 0.25


@pytest.mark.parametrize("curvature", ["hvp", "whitening"])
def test_dense_first_step(curvature):
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    key = fp.random.key(4)
    _, grads = fp.loss_and_grads(md, params, batch)
    transform = scale_by_psgd(md, variant="dense", curvature=curvature, precond_lr=0.1)
    out, state = transform.update(grads, transform.init(params), params, batch=batch, key=key)
    g = ravel(grads)[0]
    v = ravel(expected_v(params, key, 0))[0]
    h = dense_hessian(md, params, batch) @ v if curvature == "hvp" else g
    q0 = first_scale(v, h, curvature == "whitening") * torch.eye(len(v))
    q1 = reference_dense_step(q0, v, h, 0.1)
    assert_relative_close(state.factors, q1, 1e-9)
    assert_relative_close(ravel(out)[0], q1.T @ q1 @ g, 1e-9)
    assert int(state.fits) == 1 and int(state.count) == 1


@pytest.mark.parametrize("case,max_size", [("mlp", None), ("cnn", 4)])
@pytest.mark.parametrize("curvature", ["hvp", "whitening"])
def test_kron_first_step(case, max_size, curvature):
    """Per tensor: the on-the-fly scale, the two-factor fit on the matrix form (a conv kernel as
    ``(O, C·kh·kw)``, sides over ``max_size`` and vectors diagonal), then ``Q_lᵀQ_l G Q_rᵀQ_r``."""
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    key = fp.random.key(5)
    _, grads = fp.loss_and_grads(md, params, batch)
    transform = scale_by_psgd(md, variant="kron", curvature=curvature, precond_lr=0.1, max_size=max_size)
    out, state = transform.update(grads, transform.init(params), params, batch=batch, key=key)
    v_tree = expected_v(params, key, 0)
    unravel = ravel(params)[1]
    h_tree = unravel(dense_hessian(md, params, batch) @ ravel(v_tree)[0]) if curvature == "hvp" else grads
    for name, p in params.items():
        rows, cols = matrix_shape(p.shape)
        v, h, grad = (t[name].reshape(rows, cols) for t in (v_tree, h_tree, grads))
        root = first_scale(v.reshape(-1), h.reshape(-1), curvature == "whitening") ** 0.5
        dense_left = p.dim() >= 2 and 1 < rows and (max_size is None or rows <= max_size)
        dense_right = p.dim() >= 2 and 1 < cols and (max_size is None or cols <= max_size)
        left = root * (torch.eye(rows) if dense_left else torch.ones(rows))
        right = root * (torch.eye(cols) if dense_right else torch.ones(cols))
        expected_l, expected_r = reference_kron_step(left, right, v, h, 0.1)
        factors = state.factors[name]
        assert (factors.left.dim() == 2) == dense_left and (factors.right.dim() == 2) == dense_right
        assert_relative_close(as_matrix(factors.left), expected_l, 1e-9)
        assert_relative_close(as_matrix(factors.right), expected_r, 1e-9)
        expected = expected_l.T @ expected_l @ grad @ expected_r.T @ expected_r
        assert_relative_close(out[name], expected.reshape(p.shape), 1e-9)
    if case == "cnn":  # the conv kernel (3, 2, 3, 3): a 3×3 triangular left, an 18-long diagonal right
        assert state.factors["0.weight"].left.shape == (3, 3) and state.factors["0.weight"].right.shape == (18,)


# --------------------------------------------------------------------------- convergence to H⁻¹


def test_fit_approaches_the_inverse_hessian_on_a_quadratic():
    """Pairs ``(v, Hv)`` of the fixed SPD Hessian of a linear least-squares model, ``H = I ⊗ 2XᵀX``
    (row-major ``(2, 3)`` weight; Kronecker-structured, so both variants can reach the criterion's
    optimum ``P = H⁻¹``). A decaying ``precond_lr`` (0.1, 0.03, 0.01) averages out the pairs' noise."""
    torch.manual_seed(0)
    md = fp.model(nn.Linear(3, 2, bias=False).double(), fp.losses.mse("sum"))
    x = torch.randn(8, 3) @ torch.diag(torch.tensor([1.0, 0.6, 0.3]))
    hessian = dense_hessian(md, md.params(), (x, torch.randn(8, 2)))
    assert float(torch.linalg.cond(hessian)) > 10
    key = fp.random.key(6)
    q, factors = torch.eye(6), KronFactors(torch.eye(2), torch.eye(3))
    for step in range(600):
        v = fp.random.normal(fp.random.fold_in(key, step), (6,), dtype=torch.float64)
        h = hessian @ v
        lr = (0.1, 0.03, 0.01)[step // 200]
        q = dense_factor_update(q, v, h, lr)
        factors = kron_factor_update(factors, v.reshape(2, 3), h.reshape(2, 3), lr)
    inverse = torch.linalg.inv(hessian)
    left, right = factors
    for fitted in (q.T @ q, torch.kron(left.T @ left, right.T @ right)):
        error = float((fitted - inverse).norm() / inverse.norm())
        assert error < 0.05, error
    # Started from P = I, far from H⁻¹.
    assert float((torch.eye(6) - inverse).norm() / inverse.norm()) > 1.0


# --------------------------------------------------------------------------- schedules


def run_steps(transform, md, params, batch, key, steps: int):
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    states = [state]
    for _ in range(steps):
        _, state = transform.update(grads, state, params, batch=batch, key=key)
        states.append(state)
    return states


def factors_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(tree_leaves(a.factors), tree_leaves(b.factors)))


def test_interval_schedule_skips_the_hvp_and_keeps_the_factors(monkeypatch):
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    calls = []
    original = psgd_module.func.hvp
    monkeypatch.setattr(psgd_module.func, "hvp", lambda *args: calls.append(1) or original(*args))
    transform = scale_by_psgd(md, variant="kron", update_interval=3)
    states = run_steps(transform, md, params, batch, fp.random.key(0), 7)
    assert len(calls) == 3  # steps 0, 3, 6 only
    for t in range(7):
        changed = not factors_equal(states[t], states[t + 1])
        assert changed == (t % 3 == 0), t
    assert int(states[-1].fits) == 3


def test_probability_schedule_is_a_reproducible_bernoulli_draw():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    key = fp.random.key(11)
    transform = scale_by_psgd(md, variant="dense", curvature="whitening", update_probability=0.5, init_scale=1.0)
    first = run_steps(transform, md, params, batch, key, 12)
    second = run_steps(transform, md, params, batch, key, 12)
    decisions = []
    for t in range(12):
        draw_key = fp.random.split(fp.random.fold_in(key, t))[0]
        due = bool(fp.random.uniform(draw_key, (), dtype=torch.float64) < 0.5)
        decisions.append(due)
        assert (not factors_equal(first[t], first[t + 1])) == due, t
        assert factors_equal(first[t + 1], second[t + 1])
    assert 0 < sum(decisions) < 12
    assert int(first[-1].fits) == sum(decisions)


def test_on_the_fly_scale_forces_the_first_fit():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    transform = scale_by_psgd(md, update_probability=1e-6)  # init_scale=None
    states = run_steps(transform, md, params, batch, fp.random.key(0), 3)
    assert [int(s.fits) for s in states] == [0, 1, 1, 1]


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("variant", ["dense", "kron"])
@pytest.mark.parametrize("curvature", ["hvp", "whitening"])
@pytest.mark.parametrize("init_scale", [None, 1.0])
def test_extreme_gradients_give_finite_updates(variant, curvature, init_scale):
    """Zero gradients and gradients scaled by 1e-30 / 1e30, in float32: finite updates, no skipped step."""
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    params = tree_map(lambda p: p.float(), params)
    batch = (batch[0].float(), batch[1])
    _, grads = fp.loss_and_grads(md, params, batch)
    for factor in (0.0, 1e-30, 1e30):
        transform = psgd(md, 0.1, variant=variant, curvature=curvature, init_scale=init_scale, momentum=0.9)
        state = transform.init(params)
        scaled = tree_map(lambda g: g * factor, grads)
        for _ in range(3):
            updates, state = transform.update(scaled, state, params, batch=batch, key=fp.random.key(1))
            assert all(torch.isfinite(u).all() for u in tree_leaves(updates)), factor
        assert int(state.skipped) == 0, factor
        assert all(torch.isfinite(x).all() for x in tree_leaves(state.inner_state["precondition"]["psgd"].factors))


# --------------------------------------------------------------------------- vmap


@pytest.mark.parametrize("variant,curvature", [("kron", "hvp"), ("dense", "hvp"), ("kron", "whitening"),
                                               ("dense", "whitening")])
def test_ensemble_under_vmap_equals_loop(variant, curvature):
    md, _, batch = make_problem("mlp", ("cross_entropy", "mean"), n=8)
    members = [make_problem("mlp", ("cross_entropy", "mean"), seed=s)[1] for s in range(3)]
    transform = psgd(md, 0.1, variant=variant, curvature=curvature, momentum=0.9, clip=1.0, weight_decay=1e-3,
                     update_interval=2, update_probability=0.7)
    batched, _ = assert_ensemble_matches_loop(md, transform, members, batch, key=fp.random.key(9), steps=5)
    fits = batched[1].inner_state["precondition"]["psgd"].fits
    assert 1 < int(fits[0]) < 5  # the schedule fired on some steps and not on others


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def sgd_loss() -> float:
    return train_digits(lambda md, inputs: fp.sgd(0.1, momentum=0.9))


# Li's defaults (lr_params=0.01, no momentum) are made for long runs and barely move in the
# 40 steps of this test: the learning rates and momentum below are set for the short run.
# Newton type (P ≈ |H|⁻¹): a fraction of a Newton step. Whitening (P ≈ E[ggᵀ]^(-1/2), updates
# of unit size per entry, like Adam's): an Adam-sized step.
TRAINING = {
    "kron-hvp": dict(learning_rate=0.1, variant="kron", curvature="hvp", momentum=0.9),
    "dense-hvp": dict(learning_rate=0.1, variant="dense", curvature="hvp", momentum=0.9),
    "kron-whitening": dict(learning_rate=0.01, variant="kron", curvature="whitening", momentum=0.9),
    "dense-whitening": dict(learning_rate=0.01, variant="dense", curvature="whitening", momentum=0.9),
}


@pytest.mark.parametrize("name", list(TRAINING))
def test_psgd_trains_digits_below_sgd(name, sgd_loss):
    settings = dict(TRAINING[name])
    learning_rate = settings.pop("learning_rate")
    loss = train_digits(lambda md, inputs: psgd(md, learning_rate, **settings))
    assert loss < sgd_loss, f"{name}: {loss:.4f} vs SGD {sgd_loss:.4f}"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,error,word", [
    (dict(variant="diag"), ValueError, "variant"),
    (dict(curvature="fisher"), ValueError, "curvature"),
    (dict(precond_lr=0.0), ValueError, "precond_lr"),
    (dict(precond_lr=1.0), ValueError, "precond_lr"),
    (dict(init_scale=-1.0), ValueError, "init_scale"),
    (dict(update_interval=0), ValueError, "update_interval"),
    (dict(update_interval=1.5), ValueError, "update_interval"),
    (dict(update_probability=0.0), ValueError, "update_probability"),
    (dict(update_probability=1.5), ValueError, "update_probability"),
    (dict(max_size=0), ValueError, "max_size"),
    (dict(precond_lr="0.1"), TypeError, "precond_lr"),
])
def test_bad_arguments_raise_naming_them(kwargs, error, word):
    md, _, _ = make_problem("mlp", ("cross_entropy", "mean"))
    with pytest.raises(error, match=word):
        scale_by_psgd(md, **kwargs)
    with pytest.raises(error, match=word):
        psgd(md, **kwargs)


def test_bad_inputs_raise_early():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    _, grads = fp.loss_and_grads(md, params, batch)
    with pytest.raises(TypeError, match="model"):
        scale_by_psgd(None, curvature="hvp")
    with pytest.raises(ValueError, match="clip"):
        psgd(md, clip=0.0)
    with pytest.raises(ValueError, match="momentum"):
        psgd(md, momentum=1.0)
    transform = scale_by_psgd(md)
    state = transform.init(params)
    with pytest.raises(TypeError, match="'key'"):
        transform.update(grads, state, params, batch=batch)
    with pytest.raises(TypeError, match="'batch'"):
        transform.update(grads, state, params, key=fp.random.key(0))
    with pytest.raises(TypeError, match="parameters"):
        transform.update(grads, state, None, batch=batch, key=fp.random.key(0))
    with pytest.raises(ValueError, match="dtype"):
        scale_by_psgd(variant="dense", curvature="whitening").init({"a": torch.zeros(2), "b": torch.zeros(2).float()})
    with pytest.raises(TypeError, match="floating-point"):
        scale_by_psgd(curvature="whitening").init({"a": torch.zeros(2, dtype=torch.int64)})
    # Whitening needs no model and no batch, only the key.
    white = scale_by_psgd(curvature="whitening")
    out, _ = white.update(grads, white.init(params), key=fp.random.key(0))
    assert all(torch.isfinite(x).all() for x in tree_leaves(out))
