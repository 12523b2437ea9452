"""The transform type, chain, named_chain and extras."""

from __future__ import annotations

import pytest
import torch

import fprecond as fp
from fprecond.tree import tree_map


def _params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}


def _grads(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}


def test_chain_equals_applying_parts_by_hand():
    parts = [fp.clip_by_global_norm(1.0), fp.trace(0.9, nesterov=True), fp.add_decayed_weights(0.1),
             fp.scale_by_adam(), fp.scale_by_learning_rate(0.05)]
    chained = fp.chain(*parts)
    params = _params()
    state = chained.init(params)
    states = [part.init(params) for part in parts]
    for step in range(4):
        grads = _grads(step)
        updates, state = chained.update(grads, state, params)
        by_hand = grads
        for i, part in enumerate(parts):
            by_hand, states[i] = part.update(by_hand, states[i], params)
        for name in params:
            assert torch.equal(updates[name], by_hand[name])
        params = fp.apply_updates(params, updates)


def test_named_chain_state_is_readable_by_name():
    opt = fp.named_chain(("momentum", fp.trace(0.5)), ("lr", fp.scale_by_learning_rate(0.1)))
    params = _params()
    state = opt.init(params)
    grads = _grads(0)
    updates, state = opt.update(grads, state, params)
    assert set(state) == {"momentum", "lr"}
    assert torch.equal(state["momentum"].trace["w"], grads["w"])
    assert torch.allclose(updates["w"], -0.1 * grads["w"])
    with pytest.raises(ValueError, match="unique"):
        fp.named_chain(("a", fp.identity()), ("a", fp.identity()))


def test_apply_updates_is_out_of_place():
    params = _params()
    before = tree_map(torch.clone, params)
    new = fp.apply_updates(params, tree_map(torch.ones_like, params))
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert all(torch.equal(new[k], before[k] + 1) for k in params)


def test_extra_keywords_are_ignored_by_transforms_that_do_not_use_them():
    opt = fp.chain(fp.trace(0.9), fp.scale_by_adam(), fp.scale_by_learning_rate(0.1))
    params = _params()
    state = opt.init(params)
    plain, _ = opt.update(_grads(0), state, params)
    extra, _ = opt.update(_grads(0), state, params, batch=(torch.zeros(1), torch.zeros(1)), key=torch.zeros(2))
    assert all(torch.equal(plain[k], extra[k]) for k in plain)


def test_required_extra_raises_a_clear_type_error():
    def init(params):
        return fp.EmptyState()

    @fp.require_extras("needs_batch", "batch")
    def update(updates, state, params=None, **extra):
        return tree_map(lambda u: u * extra["batch"], updates), state

    opt = fp.chain(fp.identity(), fp.GradientTransformation(init, update))
    params = _params()
    state = opt.init(params)
    with pytest.raises(TypeError, match=r"needs_batch.update\(\) needs the keyword argument\(s\) 'batch'"):
        opt.update(_grads(0), state, params)
    updates, _ = opt.update(_grads(0), state, params, batch=2.0)
    assert torch.equal(updates["w"], 2.0 * _grads(0)["w"])


def test_transform_needing_params_says_so():
    opt = fp.add_decayed_weights(0.1)
    with pytest.raises(TypeError, match="add_decayed_weights.update\\(\\) needs the current parameters"):
        opt.update(_grads(0), opt.init(_params()))


def test_chain_rejects_non_transforms():
    with pytest.raises(TypeError, match="argument 1"):
        fp.chain(fp.identity(), lambda g: g)  # type: ignore[arg-type]
