"""AdaHessian: updates against a dense float64 loop, spatial averaging of kernels,
numerics, an ensemble under vmap against a loop, and training on digits against SGD."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import fprecond as fp
from fprecond.curvature.hutchinson import probe_vectors
from fprecond.optimizers.adahessian import adahessian, scale_by_adahessian, spatial_average
from fprecond.tree import ravel, tree_map

from tests.helpers import assert_ensemble_matches_loop, assert_relative_close, dense_hessian, make_problem, train_digits

adahessian_module = importlib.import_module("fprecond.optimizers.adahessian")  # the module, not the recipe it exports

KEY = fp.random.key(5)


def averaged_magnitude(raw: torch.Tensor, params, spatial: bool) -> torch.Tensor:
    """``|raw|``, with each kernel (ndim >= 3) block replaced by its mean over positions (o, c)."""
    pieces, start = [], 0
    for p in params.values():
        block = raw[start:start + p.numel()].reshape(p.shape).abs()
        start += p.numel()
        if spatial and p.ndim >= 3:
            per_channel_pair = block.reshape(p.shape[0], p.shape[1], -1).mean(-1, keepdim=True)
            block = per_channel_pair.expand(p.shape[0], p.shape[1], block[0, 0].numel())
        pieces.append(block.reshape(-1))
    return torch.cat(pieces)


def dense_adahessian(md, params, batch, steps, *, lr, b1, b2, eps, wd, power, update_each, spatial):
    """AdaHessian in flat float64 with the dense Hessian; the parameters after each step."""
    theta, unravel = ravel(params)
    m, v, diagonal = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    history = []
    for t in range(steps):
        current = unravel(theta)
        g = ravel(fp.loss_and_grads(md, current, batch)[1])[0]
        if t % update_each == 0:
            z = ravel(probe_vectors(fp.random.fold_in(KEY, t), current, "rademacher"))[0]
            diagonal = averaged_magnitude(z * (dense_hessian(md, current, batch) @ z), current, spatial)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * diagonal**2
        m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
        theta = theta - lr * (m_hat / (v_hat ** (power / 2) + eps) + wd * theta)
        history.append(theta)
    return history


@pytest.mark.parametrize("case,settings", [
    ("cnn", dict(lr=0.15, b1=0.9, b2=0.999, eps=1e-4, wd=0.0, power=1.0, update_each=1, spatial=True)),
    ("cnn", dict(lr=0.1, b1=0.8, b2=0.9, eps=1e-3, wd=0.01, power=0.5, update_each=2, spatial=True)),
    ("cnn", dict(lr=0.1, b1=0.8, b2=0.9, eps=1e-3, wd=0.0, power=1.0, update_each=1, spatial=False)),
    ("sequence", dict(lr=0.1, b1=0.9, b2=0.99, eps=1e-4, wd=0.1, power=1.0, update_each=3, spatial=True)),
])
def test_steps_equal_the_dense_formula(case, settings):
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    transform = adahessian(md, settings["lr"], b1=settings["b1"], b2=settings["b2"], eps=settings["eps"],
                           weight_decay=settings["wd"], hessian_power=settings["power"],
                           update_each=settings["update_each"], spatial_averaging=settings["spatial"])
    state = transform.init(params)
    actual = []
    for _ in range(4):
        _, grads = fp.loss_and_grads(md, params, batch)
        updates, state = transform.update(grads, state, params, batch=batch, key=KEY)
        params = fp.apply_updates(params, updates)
        actual.append(ravel(params)[0])
    expected = dense_adahessian(md, make_problem(case, ("cross_entropy", "mean"))[1], batch, 4, **settings)
    for a, e in zip(actual, expected):
        assert_relative_close(a, e, 1e-10)
    inner = state.inner_state["adahessian"]
    assert int(inner.refreshes) == len(range(0, 4, settings["update_each"]))


def test_spatial_average_of_kernels():
    torch.manual_seed(0)
    kernel = torch.randn(2, 3, 3, 3)
    averaged = spatial_average(kernel)
    assert averaged.shape == kernel.shape
    for o in range(2):
        for c in range(3):
            assert torch.allclose(averaged[o, c], kernel[o, c].abs().mean().expand(3, 3))
    kernel_1d = torch.randn(4, 2, 5)  # Conv1d: averaged over its one spatial dimension
    assert torch.allclose(spatial_average(kernel_1d), kernel_1d.abs().mean(-1, keepdim=True).expand(4, 2, 5))
    matrix = torch.randn(3, 4)
    assert torch.equal(spatial_average(matrix), matrix.abs())


def test_state_keeps_one_value_per_channel_pair_of_a_conv_kernel():
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    transform = scale_by_adahessian(md)
    _, grads = fp.loss_and_grads(md, params, batch)
    _, state = transform.update(grads, transform.init(params), params, batch=batch, key=KEY)
    kernel = state.diagonal["0.weight"]  # Conv2d(2, 3, 3)
    assert torch.equal(kernel, kernel[:, :, :1, :1].expand_as(kernel))
    assert (kernel > 0).all()
    z = probe_vectors(fp.random.fold_in(KEY, 0), params, "rademacher")
    raw = ravel(z)[0] * (dense_hessian(md, params, batch) @ ravel(z)[0])
    expected = averaged_magnitude(raw, params, spatial=True)
    assert_relative_close(ravel(state.diagonal)[0], expected, 1e-10)
    linear = state.diagonal["3.weight"]  # not averaged: |z ⊙ Hz| entry by entry
    assert torch.unique(linear).numel() > linear.numel() // 2


def test_reuses_the_estimate_between_refreshes(monkeypatch):
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    calls = []
    original = adahessian_module.hutchinson_diagonal

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(adahessian_module, "hutchinson_diagonal", counting)
    transform = scale_by_adahessian(md, update_each=3)
    state = transform.init(params)
    diagonals = []
    for _ in range(7):
        _, grads = fp.loss_and_grads(md, params, batch)
        _, state = transform.update(grads, state, params, batch=batch, key=KEY)
        diagonals.append(ravel(state.diagonal)[0])
    assert len(calls) == 3 and int(state.refreshes) == 3
    changed = [not torch.equal(diagonals[t], diagonals[t - 1]) for t in range(1, 7)]
    assert changed == [False, False, True, False, False, True]


@pytest.mark.parametrize("factor", [0.0, 1e-30, 1e30])
def test_extreme_gradients_give_finite_updates(factor):
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    transform = adahessian(md)
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    for _ in range(2):
        updates, state = transform.update(tree_map(lambda g: factor * g, grads), state, params, batch=batch, key=KEY)
        assert torch.isfinite(ravel(updates)[0]).all()
    assert int(state.skipped) == 0
    if factor == 0.0:
        assert torch.count_nonzero(ravel(updates)[0]) == 0


def test_zero_hessian_gives_the_scaled_gradient():
    """A bias-free linear model under MSE with zero inputs: H = 0, so the step is
    ``lr · m̂ / ε``, finite."""
    module = nn.Linear(3, 2, bias=False).double()
    md = fp.model(module, fp.losses.mse())
    params = md.params()
    batch = (torch.zeros(4, 3), torch.randn(4, 2))
    grads = tree_map(torch.ones_like, params)
    transform = scale_by_adahessian(md, eps=1e-4)
    updates, state = transform.update(grads, transform.init(params), params, batch=batch, key=KEY)
    assert torch.count_nonzero(state.diagonal["weight"]) == 0
    assert torch.allclose(updates["weight"], torch.full((2, 3), 1e4))


def test_ensemble_under_vmap_equals_loop_with_keys():
    md, _, batch = make_problem("cnn", ("cross_entropy", "mean"), n=6)
    transform = adahessian(md, 0.1, update_each=2, weight_decay=0.01)
    members = [make_problem("cnn", ("cross_entropy", "mean"), seed=s)[1] for s in range(3)]
    keys = torch.stack([fp.random.key(s) for s in range(3)])
    assert_ensemble_matches_loop(md, transform, members, batch, keys=keys, steps=3)


def test_trains_digits_below_sgd():
    """Default hyper-parameters (the reference's lr 0.15, betas, eps)."""
    sgd_loss = train_digits(lambda md, inputs: fp.sgd(0.1, momentum=0.9))
    loss = train_digits(lambda md, inputs: adahessian(md))
    assert loss < sgd_loss, f"adahessian: {loss:.4f} vs SGD {sgd_loss:.4f}"


def test_bad_input_raises_early():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    with pytest.raises(ValueError, match="hessian_power"):
        adahessian(md, hessian_power=1.5)
    with pytest.raises(ValueError, match="update_each"):
        adahessian(md, update_each=0)
    with pytest.raises(ValueError, match="eps"):
        adahessian(md, eps=0.0)
    with pytest.raises(ValueError, match="b1"):
        adahessian(md, b1=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        adahessian(md, weight_decay=-1.0)
    with pytest.raises(TypeError, match="model"):
        adahessian(None)  # type: ignore[arg-type]
    transform = adahessian(md)
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    with pytest.raises(TypeError, match="'key'"):
        transform.update(grads, state, params, batch=batch)
