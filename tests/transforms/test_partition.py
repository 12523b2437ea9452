"""partition: each label's transform on its own leaves, the rest untouched."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond.tree import tree_leaves

from tests.helpers import stack_trees


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(3, 4, generator=g, dtype=torch.float64),
            "b1": torch.randn(3, generator=g, dtype=torch.float64),
            "w2": torch.randn(2, 3, generator=g, dtype=torch.float64)}


def _by_ndim(params):
    return {name: "matrix" if p.ndim == 2 else "vector" for name, p in params.items()}


def test_each_label_gets_its_transform_and_state():
    params = _params()
    grads = _params(1)
    opt = fp.partition({"matrix": fp.adam(0.1), "vector": fp.sgd(0.5, momentum=0.9)}, _by_ndim)
    state = opt.init(params)
    assert set(state) == {"matrix", "vector"}
    adam, sgd = fp.adam(0.1), fp.sgd(0.5, momentum=0.9)
    matrices = {k: v for k, v in params.items() if v.ndim == 2}
    adam_state, sgd_state = adam.init(matrices), sgd.init({"b1": params["b1"]})
    for step in range(3):
        g = {k: v * (step + 1) for k, v in grads.items()}
        updates, state = opt.update(g, state, params)
        assert list(updates) == list(params)  # the parameters' order and keys
        expected_matrix, adam_state = adam.update({k: g[k] for k in matrices}, adam_state, matrices)
        expected_vector, sgd_state = sgd.update({"b1": g["b1"]}, sgd_state, {"b1": params["b1"]})
        for name in matrices:
            torch.testing.assert_close(updates[name], expected_matrix[name], rtol=0, atol=0)
        torch.testing.assert_close(updates["b1"], expected_vector["b1"], rtol=0, atol=0)


def test_labels_as_a_tree_and_an_empty_label():
    params = _params()
    opt = fp.partition({"a": fp.sgd(1.0), "b": fp.sgd(2.0)}, {"w1": "a", "b1": "a", "w2": "a"})
    state = opt.init(params)
    updates, _ = opt.update(params, state, params)
    for name in params:
        torch.testing.assert_close(updates[name], -params[name])
    # A label without leaves is never called: Adam cannot be built on an empty tree.
    opt = fp.partition({"a": fp.sgd(1.0), "b": fp.adam(1e-3)}, {"w1": "a", "b1": "a", "w2": "a"})
    state = opt.init(params)
    assert state["b"] == fp.EmptyState()
    updates, new_state = opt.update(params, state, params)
    assert new_state["b"] == fp.EmptyState()
    for name in params:
        torch.testing.assert_close(updates[name], -params[name])


def test_nested_trees_are_routed_by_path():
    params = {"layer": {"w": torch.ones(2, 2), "b": torch.ones(2)}, "scale": torch.ones(())}
    opt = fp.partition({"x": fp.sgd(1.0), "y": fp.sgd(3.0)},
                       {"layer": {"w": "x", "b": "y"}, "scale": "x"})
    updates, _ = opt.update(params, opt.init(params), params)
    torch.testing.assert_close(updates["layer"]["w"], -torch.ones(2, 2))
    torch.testing.assert_close(updates["layer"]["b"], -3 * torch.ones(2))
    torch.testing.assert_close(updates["scale"], -torch.ones(()))


def test_unknown_label_names_the_parameter():
    with pytest.raises(ValueError, match="'b1'.*'other'"):
        fp.partition({"matrix": fp.sgd(1.0)}, {"w1": "matrix", "b1": "other", "w2": "matrix"}).init(_params())
    with pytest.raises(ValueError, match="labels have 2 leaves"):
        fp.partition({"a": fp.sgd(1.0)}, {"w1": "a", "b1": "a"}).init(_params())
    with pytest.raises(TypeError, match="non-empty mapping"):
        fp.partition({}, {})


def test_ensemble_under_vmap_equals_loop():
    opt = fp.partition({"matrix": fp.adam(0.1), "vector": fp.sgd(0.5, momentum=0.9)}, _by_ndim)
    members = [_params(seed) for seed in range(3)]

    def train(params):
        state = opt.init(params)
        for _ in range(3):
            updates, state = opt.update({k: torch.sin(v) for k, v in params.items()}, state, params)
            params = fp.apply_updates(params, updates)
        return params, state

    looped = stack_trees([train(p) for p in members])
    batched = vmap(train)(stack_trees(members))
    for a, b in zip(tree_leaves(batched), tree_leaves(looped)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
