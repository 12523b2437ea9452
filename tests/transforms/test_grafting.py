"""Grafting: the norm/direction formula, the warmup, the diagonal methods against
torch.optim, numerics at extreme scales, and an ensemble under vmap."""

from __future__ import annotations

import pytest
import torch

import fprecond as fp
from fprecond.transforms.grafting import filtered_gradient, graft, safe_norm, scale_by_grafting

from tests.helpers import assert_gradient_ensemble_matches_loop


def make_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def make_grads(steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(steps)]


def test_graft_takes_the_norm_of_one_and_the_direction_of_the_other():
    magnitude, direction = fp.scale_by_adam(), fp.scale(-3.0)
    opt = graft(magnitude, direction)
    params = make_params()
    state = opt.init(params)
    adam_state = magnitude.init(params)
    for grads in make_grads(3):
        out, state = opt.update(grads, state, params)
        adam, adam_state = magnitude.update(grads, adam_state, params)
        for key in params:
            expected = -3.0 * grads[key] * adam[key].norm() / (3.0 * grads[key].norm())
            torch.testing.assert_close(out[key], expected, rtol=1e-13, atol=0)
            torch.testing.assert_close(out[key].norm(), adam[key].norm(), rtol=1e-13, atol=0)


def test_graft_warmup_returns_the_magnitude_method_first():
    opt = graft(fp.scale(2.0), fp.scale(-1.0), warmup=2)
    params = make_params()
    state = opt.init(params)
    for step, grads in enumerate(make_grads(4)):
        out, state = opt.update(grads, state, params)
        sign = 1.0 if step < 2 else -1.0
        for key in params:
            torch.testing.assert_close(out[key], sign * 2.0 * grads[key], rtol=1e-13, atol=0)


def test_zero_direction_gives_zero_and_extreme_norms_stay_finite():
    opt = graft(fp.scale(1.0), fp.scale(0.0))
    params = make_params()
    out, _ = opt.update(make_grads(1)[0], opt.init(params), params)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in out.values())
    for scale_m, scale_d in [(1.0, 1e-300), (1e300, 1e-300), (1e-300, 1e300)]:
        opt = graft(fp.scale(scale_m), fp.scale(scale_d))
        grads = make_grads(1)[0]
        out, _ = opt.update(grads, opt.init(params), params)
        for key in params:
            expected = grads[key] * scale_m
            assert torch.isfinite(out[key]).all()
            torch.testing.assert_close(out[key], expected, rtol=1e-12, atol=0)


def test_safe_norm_in_float32_at_extreme_scales():
    for scale in (1e-30, 1e30):
        x = torch.full((10,), scale, dtype=torch.float32)
        torch.testing.assert_close(safe_norm(x), torch.tensor(scale * 10 ** 0.5, dtype=torch.float32), rtol=1e-6,
                                   atol=0)
    assert float(safe_norm(torch.zeros(3))) == 0.0


def _assert_steps_match_torch(grafting, make_torch_optimizer, lr: float) -> None:
    """Four steps of ``chain(grafting, lr)`` equal four steps of the torch.optim optimizer."""
    opt = fp.chain(grafting, fp.scale_by_learning_rate(lr))
    params = make_params()
    state = opt.init(params)
    torch_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    torch_opt = make_torch_optimizer(list(torch_params.values()), lr)
    for grads in make_grads(4):
        updates, state = opt.update(grads, state, params)
        params = fp.apply_updates(params, updates)
        for key, p in torch_params.items():
            p.grad = grads[key].clone()
        torch_opt.step()
        for key in params:
            torch.testing.assert_close(params[key], torch_params[key].detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind,reference", [
    ("adagrad", lambda p, lr: torch.optim.Adagrad(p, lr=lr, eps=1e-10)),
    ("rmsprop", lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=0.99, eps=1e-8)),
])
def test_diagonal_methods_match_torch_optim(kind, reference):
    _assert_steps_match_torch(scale_by_grafting(kind), reference, lr=0.1)


def test_adam_grafting_with_filtered_gradient_is_torch_adam():
    b1, b2 = 0.9, 0.999
    _assert_steps_match_torch(scale_by_grafting("adam", b1=b1, b2=b2),
                              lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(b1, b2), eps=1e-8), lr=0.1)


def test_filtered_gradient_nesterov_is_the_look_ahead():
    b1 = 0.9
    m = torch.zeros(3)
    grads = [torch.randn(3) for _ in range(3)]
    for t, g in enumerate(grads, start=1):
        new_m, direction = filtered_gradient(m, g, b1, torch.tensor(t), nesterov=True)
        torch.testing.assert_close(new_m, b1 * m + (1 - b1) * g)
        torch.testing.assert_close(direction, (b1 ** 2 * m + (1 - b1 ** 2) * g) / (1 - b1 ** (t + 1)))
        m = new_m


def test_sgd_grafting_is_the_filtered_gradient():
    opt = scale_by_grafting("sgd", b1=0.5, bias_correction_on=False)
    params = make_params()
    state = opt.init(params)
    grads = make_grads(2)
    out, state = opt.update(grads[0], state, params)
    out, state = opt.update(grads[1], state, params)
    torch.testing.assert_close(out["w"], 0.25 * grads[0]["w"] + 0.5 * grads[1]["w"])


def test_ensemble_under_vmap_equals_loop():
    opt = graft(scale_by_grafting("adam", b1=0.9, nesterov=True), scale_by_grafting("adagrad"), warmup=1)
    members = [make_params(seed) for seed in range(3)]
    member_grads = [make_grads(3, seed=10 + i) for i in range(3)]
    assert_gradient_ensemble_matches_loop(opt, members, member_grads, rtol=1e-10, atol=1e-12)


def test_empty_parameter_tree_is_allowed():
    """``partition`` gives a label without parameters an empty dict."""
    for kind in ("sgd", "adam"):
        opt = scale_by_grafting(kind, b1=0.9)
        out, state = opt.update({}, opt.init({}))
        assert out == {} and int(state.count) == 1


@pytest.mark.parametrize("call,error,match", [
    (lambda: scale_by_grafting("lamb"), ValueError, "graft_type"),
    (lambda: scale_by_grafting("adam", b1=1.0), ValueError, "b1"),
    (lambda: scale_by_grafting("adam", b2=0.0), ValueError, "b2"),
    (lambda: scale_by_grafting("adam", eps=-1.0), ValueError, "eps"),
    (lambda: scale_by_grafting("adam", nesterov=True), ValueError, "nesterov"),
    (lambda: graft(fp.scale(1.0), "adam"), TypeError, "direction"),
    (lambda: graft(fp.scale(1.0), fp.scale(1.0), warmup=-1), ValueError, "warmup"),
])
def test_bad_arguments_raise_early(call, error, match):
    with pytest.raises(error, match=match):
        call()
