"""Shampoo: updates against dense per-mode formulas with torch.linalg.eigh, blocking,
the root schedule, numerics, an ensemble under vmap, and training on digits."""

from __future__ import annotations

import importlib

import itertools

import pytest
import torch

import fprecond as fp
from fprecond.optimizers import _blocking
from fprecond.optimizers._blocking import merge_small_dims, plan_blocks
from fprecond.optimizers.shampoo import scale_by_shampoo, shampoo

from tests.helpers import assert_gradient_ensemble_matches_loop, assert_relative_close, train_digits

shampoo_module = importlib.import_module("fprecond.optimizers.shampoo")  # the module, not the recipe it exports

TOL = 1e-10


# --------------------------------------------------------------------------- dense references


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-``mode`` unfolding ``G_(mode)``: ``(n_mode, prod of the other sizes)``."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def mode_multiply(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.tensordot(matrix, x, dims=([1], [mode])).movedim(0, mode)


def dense_power(matrix: torch.Tensor, exponent: float, epsilon: float) -> torch.Tensor:
    """``(clamp(L, 0) + ε I)^exponent`` by torch.linalg.eigh."""
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag((values.clamp(min=0.0) + epsilon) ** exponent) @ vectors.T


class DenseShampoo:
    """Shampoo on one tensor with every dimension a mode (size > 1), written out."""

    def __init__(self, shape, b2: float, epsilon: float, bias_correction: bool = True):
        self.factors = [torch.zeros(n, n) for n in shape]
        self.b2, self.epsilon, self.bias_correction = b2, epsilon, bias_correction

    def step(self, gradient: torch.Tensor, filtered: torch.Tensor, t: int) -> torch.Tensor:
        order = gradient.ndim
        out = filtered
        for mode in range(order):
            outer = unfold(gradient, mode) @ unfold(gradient, mode).T
            self.factors[mode] = (self.factors[mode] + outer if self.b2 == 1.0
                                  else self.b2 * self.factors[mode] + (1 - self.b2) * outer)
            correction = 1 - self.b2 ** t if self.bias_correction and self.b2 < 1.0 else 1.0
            root = dense_power(self.factors[mode] / correction, -1.0 / (2 * order), self.epsilon)
            out = mode_multiply(out, root, mode)
        return out


class DenseGrafting:
    """Meta's diagonal grafting methods, written out: ``ĝ / (sqrt(v̂) + eps)``."""

    def __init__(self, kind: str, shape, b2: float, eps: float):
        self.kind, self.b2, self.eps = kind, b2, eps
        self.v = torch.zeros(shape)

    def step(self, gradient: torch.Tensor, filtered: torch.Tensor, t: int) -> torch.Tensor:
        if self.kind in ("sgd", "none"):
            return filtered
        if self.kind == "adagrad":
            self.v = self.v + gradient ** 2
            return filtered / (self.v.sqrt() + self.eps)
        self.v = self.b2 * self.v + (1 - self.b2) * gradient ** 2
        v = self.v / (1 - self.b2 ** t) if self.kind == "adam" else self.v
        return filtered / (v.sqrt() + self.eps)


def make_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(3, generator=g),
            "conv": torch.randn(3, 2, 3, 3, generator=g), "scale": torch.randn((), generator=g)}


def make_grads(params, steps: int, seed: int = 10) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(steps)]


# --------------------------------------------------------------------------- the update against dense formulas

CONFIGS = {
    "adam": dict(grafting="adam"),
    "adagrad_sum_statistics": dict(grafting="adagrad", betas=(0.9, 1.0)),
    "rmsprop_no_bias_correction": dict(grafting="rmsprop", use_bias_correction=False),
    "sgd_no_ema": dict(grafting="sgd", betas=(0.0, 0.9)),
    "none": dict(grafting="none"),
    "nesterov_momentum_decoupled_decay": dict(grafting="adam", momentum=0.5, nesterov=True, weight_decay=0.1),
    "l2_decay": dict(grafting="adam", weight_decay=0.1, decoupled_weight_decay=False),
}


@pytest.mark.parametrize("merge_dims", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_update_is_the_grafted_dense_formula(name, merge_dims):
    """Three steps: per tensor ``-lr · graft(‖A‖, D)`` with ``D = Ĝ ×_i (L̂_i + εI)^(-1/(2k))``:
    ``L^{-1/4} Ĝ R^{-1/4}`` for the weight, ``L^{-1/2} ĝ`` for the bias, the 4 per-mode
    roots ``^(-1/8)`` for the conv kernel (``merge_dims=False``) or, merged as Meta
    does, one ``54 × 54`` factor ``^(-1/2)``; the scalar gets the grafting method alone."""
    config = dict(CONFIGS[name])
    lr, epsilon, grafting_epsilon = 0.1, 1e-3, 1e-8
    b1, b2 = config.pop("betas", (0.9, 0.99))
    kind = config["grafting"]
    momentum, nesterov = config.get("momentum", 0.0), config.get("nesterov", False)
    weight_decay = config.get("weight_decay", 0.0)
    decoupled = config.get("decoupled_weight_decay", True)
    corrected = config.get("use_bias_correction", True)
    opt = shampoo(lr, (b1, b2), epsilon, precondition_frequency=1, merge_dims=merge_dims,
                  grafting_epsilon=grafting_epsilon, **config)
    params = make_params()
    state = opt.init(params)
    shapes = {k: ((54,) if merge_dims and k == "conv" else (12,) if merge_dims and k == "weight" else v.shape)
              for k, v in params.items()}
    shampoos = {k: DenseShampoo(shapes[k], b2, epsilon, corrected) for k in params if k != "scale"}
    graftings = {k: DenseGrafting(kind, v.shape, b2, grafting_epsilon)
                 for k, v in params.items()}
    ema = {k: torch.zeros_like(v) for k, v in params.items()}
    heavy_ball = {k: torch.zeros_like(v) for k, v in params.items()}
    for t, grads in enumerate(make_grads(params, 3), start=1):
        updates, state = opt.update(grads, state, params)
        for key, theta in params.items():
            g = grads[key] + (0.0 if decoupled else weight_decay * theta)
            ema[key] = b1 * ema[key] + (1 - b1) * g
            filtered = (b1 * ema[key] + (1 - b1) * g) if nesterov else ema[key]
            if b1 and corrected:
                filtered = filtered / (1 - b1 ** (t + 1 if nesterov else t))
            magnitude = graftings[key].step(g, filtered, t)
            if key == "scale":
                direction = magnitude
            else:
                raw = shampoos[key].step(g.reshape(shapes[key]), filtered.reshape(shapes[key]), t).reshape(g.shape)
                direction = raw if kind == "none" else raw * magnitude.norm() / raw.norm()
            if decoupled:
                direction = direction + weight_decay * theta
            if momentum:
                heavy_ball[key] = momentum * heavy_ball[key] + direction
                direction = direction + momentum * heavy_ball[key] if nesterov else heavy_ball[key]
            assert_relative_close(updates[key], -lr * direction, TOL)
        params = fp.apply_updates(params, updates)


def test_state_is_reachable_by_name():
    params = make_params()
    opt = shampoo(precondition_frequency=1, merge_dims=False)
    state = opt.init(params)
    _, state = opt.update(make_grads(params, 1)[0], state, params)
    inner = state.inner_state["shampoo"]["shampoo"].direction_state
    left, right = inner.statistics["weight"][0]
    assert left.shape == (1, 4, 4) and right.shape == (1, 3, 3)
    assert set(state.inner_state["shampoo"]["grafting_only"].nu_sqrt) == {"scale"}


# --------------------------------------------------------------------------- blocking


@pytest.mark.parametrize("shape,max_dim,merge,expected", [
    ((5, 7), 3, True, (5, 7)),
    ((3, 2, 3, 3), 1024, True, (54,)),
    ((64, 32, 3, 3), 1024, True, (64, 288)),
    ((1, 5, 1), 3, True, (5,)),
    ((), 4, True, ()),
])
def test_merge_small_dims_follows_meta(shape, max_dim, merge, expected):
    assert merge_small_dims(shape, max_dim) == expected


@pytest.mark.parametrize("shape,max_dim", [((5, 7), 3), ((7,), 3), ((6, 9, 4), 4), ((2, 1, 5), 2), ((), 3)])
def test_blocks_split_and_merge_back(shape, max_dim):
    x = torch.randn(shape)
    plan = plan_blocks(shape, max_dim, merge_dims=False)
    blocks = plan.split(x)
    assert all(max(b.shape[1:], default=1) <= max_dim for b in blocks)
    assert sum(b.numel() for b in blocks) == x.numel()
    torch.testing.assert_close(plan.merge(blocks), x, rtol=0, atol=0)


def test_blocked_shampoo_is_shampoo_per_block():
    """5 x 7 with blocks of at most 3: row blocks [0:3], [3:5], column blocks [0:3], [3:6],
    [6:7]; every block is preconditioned by its own factors (a ``(n, 1)`` block as the
    vector it is: ``L^{-1/2} g``); a vector of 7 in blocks 3, 3, 1. Without grafting and
    with lr 1 the update is ``-D``."""
    epsilon, b2 = 1e-3, 0.9
    opt = shampoo(1.0, (0.0, b2), epsilon, precondition_frequency=1, grafting="none", max_preconditioner_dim=3)
    params = {"w": torch.randn(5, 7), "v": torch.randn(7)}
    state = opt.init(params)
    vector_blocks = [slice(0, 3), slice(3, 6), slice(6, 7)]  # the last one a 1 x 1 factor: AdaGrad on one entry
    vector_references = [DenseShampoo([s.stop - s.start], b2, epsilon) for s in vector_blocks]
    groups = list(shampoo_module.plan_blocks((5, 7), 3).groups)
    assert [g.block_shape for g in groups] == [(3, 3), (3, 1), (2, 3), (2, 1)]
    rows, columns = [slice(0, 3), slice(3, 5)], [slice(0, 3), slice(3, 6), slice(6, 7)]
    references = {(r.start, c.start): DenseShampoo([n for n in (r.stop - r.start, c.stop - c.start) if n > 1], b2,
                                                   epsilon) for r, c in itertools.product(rows, columns)}
    for t, grads in enumerate(make_grads(params, 3), start=1):
        updates, state = opt.update(grads, state, params)
        expected = torch.empty(5, 7)
        for r, c in itertools.product(rows, columns):
            block = grads["w"][r, c]
            squeezed = block.reshape([n for n in block.shape if n > 1])
            expected[r, c] = references[(r.start, c.start)].step(squeezed, squeezed, t).reshape(block.shape)
        assert_relative_close(updates["w"], -expected, TOL)
        expected_v = torch.cat([reference.step(grads["v"][s], grads["v"][s], t)
                                for s, reference in zip(vector_blocks, vector_references)])
        assert_relative_close(updates["v"], -expected_v, TOL)


def test_newton_roots_agree_with_eigh():
    params = make_params()
    grads = make_grads(params, 3)
    results = {}
    for method in ("eigh", "newton"):
        opt = shampoo(0.1, epsilon=1e-3, precondition_frequency=1, merge_dims=False, method=method)
        state = opt.init(params)
        out = []
        for g in grads:
            updates, state = opt.update(g, state, params)
            out.append(updates)
        results[method] = out
    for eigh_updates, newton_updates in zip(results["eigh"], results["newton"]):
        for key in params:
            assert_relative_close(newton_updates[key], eigh_updates[key], 1e-6)


def test_relative_ridge_scales_with_the_largest_eigenvalue():
    """``matrix_eps`` adds ``matrix_eps · λ_max(L̂) · I`` (Anil et al.) to the statistics
    (``λ_max`` by power iteration: singular values 3, 1, 0.5 make it converge)."""
    generator = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(4, 3, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(3, 3, generator=generator)).Q
    g = u @ torch.diag(torch.tensor([3.0, 1.0, 0.5])) @ v.T
    opt = scale_by_shampoo(0.0, 1.0, 0.0, matrix_eps=0.1, precondition_frequency=1, merge_dims=False)
    direction, _ = opt.update({"w": g}, opt.init({"w": g}))
    left, right = g @ g.T, g.T @ g
    ridge_l, ridge_r = 0.1 * torch.linalg.eigvalsh(left)[-1], 0.1 * torch.linalg.eigvalsh(right)[-1]
    expected = dense_power(left, -0.25, ridge_l) @ g @ dense_power(right, -0.25, ridge_r)
    assert_relative_close(direction["w"], expected, 1e-8)


# --------------------------------------------------------------------------- schedules


def test_roots_are_refreshed_only_on_due_steps(monkeypatch):
    """precondition_frequency 3, start 3: roots at steps 3 and 6 only (stale in between,
    while the statistics move); before step 3 the update is Adam grafting's alone."""
    calls = []
    real = shampoo_module.eigh_power
    monkeypatch.setattr(shampoo_module, "eigh_power", lambda *a, **k: calls.append(1) or real(*a, **k))
    params = {"w": torch.randn(4, 3)}
    lr, b1, b2 = 0.1, 0.9, 0.99
    opt = shampoo(lr, (b1, b2), 1e-3, precondition_frequency=3, merge_dims=False)
    state = opt.init(params)
    adam = DenseGrafting("adam", (4, 3), b2, 1e-8)
    ema = torch.zeros(4, 3)
    roots_seen, calls_per_step = [], []
    for t, grads in enumerate(make_grads(params, 7), start=1):
        before = len(calls)
        updates, state = opt.update(grads, state, params)
        calls_per_step.append(len(calls) - before)
        inner = state.inner_state["shampoo"]["shampoo"].direction_state
        roots_seen.append(inner.roots["w"][0][0].clone())
        ema = b1 * ema + (1 - b1) * grads["w"]
        magnitude = adam.step(grads["w"], ema / (1 - b1 ** t), t)
        if t < 3:
            assert_relative_close(updates["w"], -lr * magnitude, TOL)
        if t in (3, 6):
            statistics = inner.statistics["w"][0][0][0]
            expected = dense_power(statistics / (1 - b2 ** t), -0.25, 1e-3)
            assert_relative_close(roots_seen[-1][0], expected, 1e-10)
    assert calls_per_step == [0, 0, 2, 0, 0, 2, 0]
    eye = torch.eye(4)[None]
    assert torch.equal(roots_seen[0], eye) and torch.equal(roots_seen[1], eye)
    assert torch.equal(roots_seen[2], roots_seen[3]) and torch.equal(roots_seen[3], roots_seen[4])
    assert not torch.equal(roots_seen[4], roots_seen[5])
    assert torch.equal(roots_seen[5], roots_seen[6])


def test_statistics_every_thins_the_statistics():
    opt = scale_by_shampoo(0.0, 1.0, 1e-3, statistics_every=2, precondition_frequency=2, merge_dims=False)
    params = {"w": torch.randn(4, 3)}
    state = opt.init(params)
    grads = make_grads(params, 4)
    for g in grads:
        _, state = opt.update(g, state, params)
    expected = sum(grads[i]["w"] @ grads[i]["w"].T for i in (1, 3))
    torch.testing.assert_close(state.statistics["w"][0][0][0], expected)
    assert int(state.statistics_count) == 2


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("case", ["zero", "rank_one", "tiny", "huge"])
def test_updates_stay_finite(case):
    params = make_params()
    opt = shampoo(0.1, precondition_frequency=1, merge_dims=False, epsilon=1e-12)
    state = opt.init(params)
    direction = {k: torch.randn(v.shape) for k, v in params.items()}
    for step, grads in enumerate(make_grads(params, 4)):
        if case == "zero":
            grads = {k: torch.zeros_like(v) for k, v in grads.items()}
        elif case == "rank_one":  # the same direction every step: rank-1 statistics
            grads = {k: (step + 1.0) * v for k, v in direction.items()}
        else:
            grads = {k: v * (1e-30 if case == "tiny" else 1e30) for k, v in grads.items()}
        updates, state = opt.update(grads, state, params)
        assert all(torch.isfinite(u).all() for u in updates.values())
        assert int(state.skipped) == 0
        if case in ("rank_one", "huge"):  # grafting keeps Adam's step size (lr-sized), whatever the scale
            assert all(1e-3 < u.abs().max() < 1.0 for u in updates.values())


def test_non_finite_statistics_keep_the_previous_root():
    opt = scale_by_shampoo(0.0, 0.9, 1e-3, precondition_frequency=1, merge_dims=False)
    params = {"w": torch.randn(4, 3)}
    state = opt.init(params)
    _, state = opt.update(make_grads(params, 1)[0], state, params)
    bad = {"w": torch.full((4, 3), float("nan"))}
    _, bad_state = opt.update(bad, state, params)
    for old, new in zip(state.roots["w"][0], bad_state.roots["w"][0]):
        assert torch.equal(old, new)
    assert int(bad_state.rejected) == 2


# --------------------------------------------------------------------------- ensembles


def test_ensemble_under_vmap_equals_loop():
    """Three members, four steps, roots at steps 1 (start), 2 and 4.

    ``epsilon`` 1e-8: the merged conv kernel has a 54 x 54 factor of rank <= 4, and
    with ε = 1e-12 its null space amplifies rounding (batched and single matmuls round
    differently) by ``ε^(-1/2) = 1e6``, which alone would break rtol 1e-8."""
    opt = shampoo(0.1, epsilon=1e-8, precondition_frequency=2, start_preconditioning_step=1, momentum=0.5,
                  weight_decay=0.01)
    members = [make_params(seed) for seed in range(3)]
    member_grads = [make_grads(members[0], 4, seed=20 + i) for i in range(3)]
    assert_gradient_ensemble_matches_loop(opt, members, member_grads)


# --------------------------------------------------------------------------- training


def test_trains_digits_below_sgd():
    sgd_loss = train_digits(lambda md, inputs: fp.sgd(0.1, momentum=0.9))
    # 40 steps: the default precondition_frequency (100, Meta's README) would never
    # precondition, and lr 1e-3 (Meta's AdamW example, for long runs) barely moves in
    # 40 steps; 10 and 5e-2 fit this task (the step size is Adam grafting's).
    loss = train_digits(lambda md, inputs: shampoo(5e-2, precondition_frequency=10))
    assert loss < sgd_loss


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(learning_rate=0.0), ValueError, "learning_rate"),
    (dict(betas=(1.0, 0.9)), ValueError, "betas"),
    (dict(betas=(0.9, 0.0)), ValueError, "betas"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(epsilon=-1.0), ValueError, "epsilon"),
    (dict(grafting="lamb"), ValueError, "grafting"),
    (dict(method="svd"), ValueError, "method"),
    (dict(max_preconditioner_dim=0), ValueError, "max_preconditioner_dim"),
    (dict(precondition_frequency=0), ValueError, "precondition_frequency"),
    (dict(start_preconditioning_step=0), ValueError, "start_preconditioning_step"),
    (dict(statistics_every=1.5), ValueError, "statistics_every"),
    (dict(method="newton", exponent_multiplier=1.8), ValueError, "exponent_multiplier"),
    (dict(root_override=0), ValueError, "root_override"),
    (dict(betas=(0.0, 0.9), nesterov=True), ValueError, "nesterov"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(grafting_epsilon=-1.0), ValueError, "grafting_epsilon"),
])
def test_bad_arguments_raise_early(kwargs, error, match):
    with pytest.raises(error, match=match):
        shampoo(**kwargs)


def test_blocking_rejects_a_bad_max_dim():
    with pytest.raises(ValueError, match="max_dim"):
        _blocking.plan_blocks((3, 3), 0)
