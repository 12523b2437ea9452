"""SGD, Adam, AdamW follow torch.optim; building blocks against their formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fprecond as fp
from fprecond.tree import tree_map

STEPS = 20


def _problem():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    md = fp.model(module, fp.losses.cross_entropy())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(STEPS)]
    return md, batches


def _run_fprecond(md, batches, opt):
    params = md.params()
    state = opt.init(params)
    trajectory = []
    for batch in batches:
        _, grads = fp.loss_and_grads(md, params, batch)
        updates, state = opt.update(grads, state, params)
        params = fp.apply_updates(params, updates)
        trajectory.append(params)
    return trajectory


def _run_torch(md, batches, make_optimizer):
    module = md.module
    initial = md.params()
    optimizer = make_optimizer(module.parameters())
    trajectory = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(inputs), targets).backward()
        optimizer.step()
        trajectory.append({k: p.detach().clone() for k, p in module.named_parameters()})
    with torch.no_grad():  # restore the module for the next comparison
        for name, p in module.named_parameters():
            p.copy_(initial[name])
    return trajectory


CASES = {
    "sgd": (lambda: fp.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd-momentum": (lambda: fp.sgd(0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "sgd-nesterov-wd": (lambda: fp.sgd(0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2)),
    "adam": (lambda: fp.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "adam-l2-amsgrad": (lambda: fp.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=1e-2, amsgrad=True),
                        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2,
                                                   amsgrad=True)),
    "adamw": (lambda: fp.adamw(1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    "adamw-amsgrad": (lambda: fp.adamw(3e-3, weight_decay=0.05, amsgrad=True),
                      lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05, amsgrad=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_follows_torch_optim_for_20_steps(name):
    make_ours, make_theirs = CASES[name]
    md, batches = _problem()
    ours = _run_fprecond(md, batches, make_ours())
    theirs = _run_torch(md, batches, make_theirs)
    moved = max((theirs[-1][k] - md.params()[k]).abs().max().item() for k in theirs[-1])
    assert moved > 1e-2  # the comparison is not between two parameter sets that barely moved
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=f"step {step}, {k}")


def test_learning_rate_schedule_matches_torch_lambda_lr():
    md, batches = _problem()
    schedule = fp.schedules.cosine_decay_schedule(0.2, decay_steps=STEPS, alpha=0.1)
    ours = _run_fprecond(md, batches, fp.sgd(schedule, momentum=0.9))

    class ScheduledSGD(torch.optim.SGD):
        """torch's SGD with the learning rate of the cosine formula set before each step."""

        def step(self, closure=None):
            for group in self.param_groups:
                step = group.setdefault("count", 0)
                group["lr"] = 0.2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, STEPS) / STEPS)))
                group["count"] = step + 1
            return super().step(closure)

    make_torch = lambda parameters: ScheduledSGD(parameters, lr=0.2, momentum=0.9)
    theirs = _run_torch(md, batches, make_torch)
    for a, b in zip(ours, theirs):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_clip_by_global_norm_matches_formula():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0], [4.0]])}  # norm 5
    clipped, _ = fp.clip_by_global_norm(1.0).update(grads, fp.EmptyState())
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([[0.0], [0.8]]))
    unclipped, _ = fp.clip_by_global_norm(10.0).update(grads, fp.EmptyState())
    assert torch.equal(unclipped["a"], grads["a"])
    zero, _ = fp.clip_by_global_norm(1.0).update(tree_map(torch.zeros_like, grads), fp.EmptyState())
    assert torch.equal(zero["a"], torch.zeros(2))


def test_apply_if_finite_skips_nan_steps_and_counts_them():
    md, batches = _problem()
    opt = fp.apply_if_finite(fp.adam(1e-2))
    params = md.params()
    state = opt.init(params)
    _, grads = fp.loss_and_grads(md, params, batches[0])
    updates, state = opt.update(grads, state, params)
    params = fp.apply_updates(params, updates)
    inner_before = state.inner_state
    bad = dict(grads)
    bad["0.weight"] = grads["0.weight"].clone()
    bad["0.weight"][0, 0] = float("nan")
    updates, state = opt.update(bad, state, params)
    new_params = fp.apply_updates(params, updates)
    assert all(torch.equal(new_params[k], params[k]) for k in params)
    assert state.skipped.item() == 1 and state.consecutive_skipped.item() == 1 and not state.last_finite
    for a, b in zip(fp.tree.tree_leaves(state.inner_state), fp.tree.tree_leaves(inner_before)):
        assert torch.equal(a, b)
    _, state = opt.update(tree_map(lambda g: g * float("inf"), grads), state, params)
    assert state.skipped.item() == 2 and state.consecutive_skipped.item() == 2
    updates, state = opt.update(grads, state, params)
    assert state.skipped.item() == 2 and state.consecutive_skipped.item() == 0 and state.last_finite
    assert fp.tree.tree_all_finite(updates) and fp.tree.tree_global_norm(updates) > 0


def test_apply_if_finite_also_catches_a_non_finite_inner_update():
    blow_up = fp.scale(float("1e308"))
    opt = fp.apply_if_finite(fp.chain(blow_up, blow_up))
    params = {"w": torch.ones(2)}
    updates, state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    assert torch.equal(updates["w"], torch.zeros(2)) and state.skipped.item() == 1


@pytest.mark.parametrize(
    "bad",
    [lambda: fp.sgd(-0.1), lambda: fp.sgd(0.1, momentum=1.0), lambda: fp.sgd(0.1, nesterov=True),
     lambda: fp.adam(b1=1.0), lambda: fp.adam(eps=-1.0), lambda: fp.adamw(weight_decay=-1.0),
     lambda: fp.clip_by_global_norm(0.0)],
)
def test_bad_hyperparameters_are_rejected_at_construction(bad):
    with pytest.raises(ValueError):
        bad()


def test_schedules_match_closed_forms():
    s = fp.schedules
    count = torch.tensor(5)
    assert s.constant_schedule(0.3)(count).item() == pytest.approx(0.3)
    assert s.linear_schedule(1.0, 0.0, 10)(count).item() == pytest.approx(0.5)
    assert s.linear_schedule(1.0, 0.0, 10, transition_begin=8)(count).item() == pytest.approx(1.0)
    assert s.cosine_decay_schedule(2.0, 10)(count).item() == pytest.approx(1.0)
    assert s.cosine_decay_schedule(2.0, 10, alpha=0.5)(torch.tensor(30)).item() == pytest.approx(1.0)
    warm = s.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=20, end_value=0.1)
    assert warm(count).item() == pytest.approx(0.5)
    assert warm(torch.tensor(10)).item() == pytest.approx(1.0)
    assert warm(torch.tensor(15)).item() == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert s.exponential_decay(1.0, 0.5, 2)(count).item() == pytest.approx(0.5 ** 2.5)
    assert s.exponential_decay(1.0, 0.5, 2, staircase=True)(count).item() == pytest.approx(0.25)
    assert s.exponential_decay(1.0, 0.5, 1, end_value=0.1)(count).item() == pytest.approx(0.1)
