"""Every transform under torch.func.vmap over an ensemble of 3 members equals a loop."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond.tree import tree_leaves, tree_map

from tests.helpers import stack_trees

MEMBERS = 3

TRANSFORMS = {
    "scale": lambda: fp.scale(0.5),
    "scale_by_learning_rate": lambda: fp.scale_by_learning_rate(0.1),
    "scheduled_learning_rate": lambda: fp.scale_by_learning_rate(fp.schedules.warmup_cosine_decay_schedule(0, 1, 2, 6)),
    "trace": lambda: fp.trace(0.9),
    "trace_nesterov": lambda: fp.trace(0.9, nesterov=True),
    "add_decayed_weights": lambda: fp.add_decayed_weights(0.1, mask={"w": True, "b": False}),
    "scale_by_adam": lambda: fp.scale_by_adam(),
    "scale_by_amsgrad": lambda: fp.scale_by_adam(amsgrad=True),
    "clip_by_global_norm": lambda: fp.clip_by_global_norm(1.0),
    "apply_if_finite": lambda: fp.apply_if_finite(fp.adam(1e-2)),
    "chain": lambda: fp.chain(fp.clip_by_global_norm(2.0), fp.trace(0.5), fp.scale_by_learning_rate(0.1)),
    "named_chain": lambda: fp.named_chain(("adam", fp.scale_by_adam()), ("lr", fp.scale_by_learning_rate(0.1))),
    "sgd": lambda: fp.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda: fp.adam(1e-2, weight_decay=1e-3),
    "adamw": lambda: fp.adamw(1e-2),
}


def _member_params(i):
    g = torch.Generator().manual_seed(i)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def _member_grads(i, step):
    g = torch.Generator().manual_seed(1000 * i + step)
    grads = {"w": 3 * torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    if i == 1 and step == 2:  # one member meets a NaN: the others must not notice
        grads["w"][0, 0] = float("nan")
    return grads


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_vmap_over_ensemble_equals_loop(name):
    opt = TRANSFORMS[name]()
    uses_nan = name == "apply_if_finite"

    def grads_for(i, step):
        grads = _member_grads(i, step)
        return grads if uses_nan else tree_map(torch.nan_to_num, grads)

    # Loop.
    looped = []
    for i in range(MEMBERS):
        params = _member_params(i)
        state = opt.init(params)
        for step in range(5):
            updates, state = opt.update(grads_for(i, step), state, params)
            params = fp.apply_updates(params, updates)
        looped.append((params, state))

    # Ensemble.
    params = stack_trees([_member_params(i) for i in range(MEMBERS)])
    state = vmap(opt.init)(params)
    step_fn = vmap(lambda g, s, p: opt.update(g, s, p))
    for step in range(5):
        grads = stack_trees([grads_for(i, step) for i in range(MEMBERS)])
        updates, state = step_fn(grads, state, params)
        params = vmap(fp.apply_updates)(params, updates)

    for i, (member_params, member_state) in enumerate(looped):
        for a, b in zip(tree_leaves((params, state)), tree_leaves((member_params, member_state))):
            torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12)
    if uses_nan:
        assert state.skipped.tolist() == [0, 1, 0]
