"""Ensembles: per-seed initialisation, the vmapped step against a loop, members, predictions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fprecond as fp
from fprecond.ensemble import ensemble_predict, ensemble_step, init_ensemble, member, stack_members
from fprecond.training import train_step
from fprecond.tree import tree_leaves

from tests.helpers import stack_trees

SEEDS = (3, 7, 11)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def conv_norm() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3))


def batch_of(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("build", [mlp, conv_norm], ids=["mlp", "conv_norm"])
def test_init_reproduces_per_seed_modules(build):
    torch.manual_seed(0)
    module = build()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    rng = torch.get_rng_state()
    stacked = init_ensemble(module, SEEDS)

    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())
    assert list(stacked) == list(before)
    for k, seed in enumerate(SEEDS):
        torch.manual_seed(seed)
        built = build()  # layers initialise in construction order, as reset_parameters in modules() order
        fresh = copy.deepcopy(module)
        torch.manual_seed(seed)
        for sub in fresh.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        for name, p in built.named_parameters():
            assert torch.equal(stacked[name][k], p.detach())
            assert torch.equal(stacked[name][k], dict(fresh.named_parameters())[name].detach())
    assert not torch.equal(stacked["0.weight"][0], stacked["0.weight"][1])


def test_init_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seeds"):
        init_ensemble(mlp(), [])
    with pytest.raises(TypeError, match="seed"):
        init_ensemble(mlp(), [1, 2.5])
    with pytest.raises(TypeError, match="module"):
        init_ensemble({"w": torch.zeros(2)}, [1])


def kfac(md):
    return fp.kfac(md, inverse_every=2, warmup=1)  # refreshes on steps 0 and 2 of the 4 tested, not 1 and 3


@pytest.mark.parametrize("shared_batch", [True, False])
def test_ensemble_training_with_kfac_equals_a_loop(shared_batch):
    module = mlp()
    md = fp.model(module, fp.losses.cross_entropy())
    transform = kfac(md)
    step = train_step(md, transform)
    stacked = init_ensemble(module, SEEDS)
    keys = torch.stack([fp.random.key(s) for s in SEEDS])
    batches = [batch_of(seed=20 + k) for k in range(len(SEEDS))]
    shared = batch_of()

    looped = []
    for k in range(len(SEEDS)):
        params = member(stacked, k)
        state = transform.init(params)
        for _ in range(4):
            params, state, metrics = step(params, state, shared if shared_batch else batches[k], keys[k])
        looped.append((params, state, metrics))

    params, state = stacked, torch.func.vmap(transform.init)(stacked)
    batched = ensemble_step(step, shared_batch=shared_batch)
    for _ in range(4):
        params, state, metrics = batched(params, state, shared if shared_batch else stack_trees(batches), keys)
    assert metrics["loss"].shape == (len(SEEDS),)
    assert state.inner_state["precondition"].refreshes.tolist() == [2, 2, 2]
    for a, b in zip(tree_leaves((params, state, metrics)), tree_leaves(stack_trees(looped))):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_ensemble_step_without_keys():
    module = mlp()
    md = fp.model(module, fp.losses.mse())
    transform = fp.adam(1e-2)
    stacked = init_ensemble(module, SEEDS)
    inputs, _ = batch_of()
    batch = (inputs, torch.randn(len(inputs), 3, generator=torch.Generator().manual_seed(5)))
    step = train_step(md, transform)
    params, _, metrics = ensemble_step(step)(stacked, torch.func.vmap(transform.init)(stacked), batch)
    for k in range(len(SEEDS)):
        one = member(stacked, k)
        expected, _, expected_metrics = step(one, transform.init(one), batch, None)
        assert all(torch.allclose(params[name][k], value, rtol=1e-12) for name, value in expected.items())
        assert torch.allclose(metrics["loss"][k], expected_metrics["loss"], rtol=1e-12)


def test_member_round_trip_into_a_module():
    module = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).eval()
    md = fp.model(module, fp.losses.cross_entropy())
    stacked = init_ensemble(module, SEEDS)
    buffers = {**md.buffers(), "1.running_mean": torch.linspace(-1.0, 1.0, 5)}
    inputs, _ = batch_of()
    mapped = torch.func.vmap(md.apply, in_dims=(0, None, None))(stacked, inputs, buffers)
    for k in (0, 2, -1):
        target = copy.deepcopy(module)
        result = target.load_state_dict(member(stacked, k), strict=False)
        # Only buffers are missing (BatchNorm does not report its num_batches_tracked).
        assert not result.unexpected_keys and set(result.missing_keys) == {"1.running_mean", "1.running_var"}
        target.load_state_dict(member(stacked, k, buffers=buffers))  # strict: parameters and buffers
        assert torch.allclose(target(inputs), mapped[k], rtol=1e-12, atol=1e-14)
    picked = member(stacked, 1)
    picked["0.weight"].add_(1.0)  # a copy: the stacked tensor is not changed
    assert not torch.equal(picked["0.weight"], stacked["0.weight"][1])
    assert all(torch.equal(stack_members([member(stacked, k) for k in range(3)])[name], value)
               for name, value in stacked.items())


def test_member_and_stack_members_reject_mismatches():
    stacked = init_ensemble(mlp(), SEEDS)
    with pytest.raises(IndexError, match="index"):
        member(stacked, 3)
    with pytest.raises(ValueError, match="member 1"):
        stack_members([member(stacked, 0), {"0.weight": torch.zeros(5, 4)}])
    other = member(stacked, 1)
    other["0.bias"] = torch.zeros(6)
    with pytest.raises(ValueError, match="0.bias"):
        stack_members([member(stacked, 0), other])
    with pytest.raises(ValueError, match="non-empty"):
        stack_members([])


@pytest.mark.parametrize("loss, probabilities", [("cross_entropy", True), ("cross_entropy", False), ("mse", True)])
def test_predict_mean_and_spread_against_a_loop(loss, probabilities):
    module = mlp()
    md = fp.model(module, getattr(fp.losses, loss)())
    stacked = init_ensemble(module, (0, 1, 2, 3))
    inputs, _ = batch_of()
    mean, spread = ensemble_predict(md, stacked, inputs, probabilities=probabilities)

    outputs = []
    for k in range(4):
        target = copy.deepcopy(module)
        target.load_state_dict(member(stacked, k))
        with torch.no_grad():
            out = target(inputs)
        outputs.append(torch.softmax(out, dim=1) if loss == "cross_entropy" and probabilities else out)
    expected_mean = sum(outputs) / 4
    expected_spread = torch.sqrt(sum((out - expected_mean) ** 2 for out in outputs) / 4)
    assert mean.shape == spread.shape == (len(inputs), 3)
    assert torch.allclose(mean, expected_mean, rtol=1e-12, atol=1e-14)
    assert torch.allclose(spread, expected_spread, rtol=1e-10, atol=1e-14)
    if loss == "cross_entropy" and probabilities:
        assert torch.allclose(mean.sum(dim=1), torch.ones(len(inputs)))
    single = ensemble_predict(md, {name: value[:1] for name, value in stacked.items()}, inputs)[1]
    assert torch.equal(single, torch.zeros_like(single))  # one member: no spread, not NaN
