"""Tree helpers and the pytree dataclass decorator."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from fprecond import tree as T


def _params():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_arithmetic_matches_leafwise_torch():
    a = _params()
    b = T.tree_map(lambda x: torch.randn_like(x), a)
    for name in a:
        assert torch.equal(T.tree_add(a, b)[name], a[name] + b[name])
        assert torch.equal(T.tree_sub(a, b)[name], a[name] - b[name])
        assert torch.equal(T.tree_scale(a, 2.5)[name], 2.5 * a[name])
        assert torch.equal(T.tree_add_scaled(a, b, -0.5)[name], a[name] - 0.5 * b[name])
        assert torch.equal(T.tree_zeros_like(a)[name], torch.zeros_like(a[name]))
        assert torch.equal(T.tree_ones_like(a)[name], torch.ones_like(a[name]))
    flat_a = torch.cat([x.reshape(-1) for x in a.values()])
    flat_b = torch.cat([x.reshape(-1) for x in b.values()])
    torch.testing.assert_close(T.tree_vdot(a, b), flat_a @ flat_b)
    torch.testing.assert_close(T.tree_global_norm(a), flat_a.norm())
    assert T.tree_size(a) == flat_a.numel()


def test_vdot_pairs_leaves_by_key_not_position():
    a = {"x": torch.tensor([1.0]), "y": torch.tensor([2.0])}
    b = {"y": torch.tensor([10.0]), "x": torch.tensor([100.0])}
    assert T.tree_vdot(a, b).item() == 1.0 * 100.0 + 2.0 * 10.0


def test_ravel_follows_named_parameters_order_and_round_trips():
    params = _params()
    reordered = dict(reversed(list(params.items())))  # insertion order differs from sorted order
    flat, unravel = T.ravel(reordered)
    expected = torch.cat([x.reshape(-1) for x in reordered.values()])
    assert torch.equal(flat, expected)
    rebuilt = unravel(flat)
    assert list(rebuilt) == list(reordered)
    assert all(torch.equal(rebuilt[k], reordered[k]) for k in reordered)
    with pytest.raises(ValueError, match="entries"):
        unravel(flat[:-1])


def test_where_and_all_finite():
    a, b = {"x": torch.ones(2)}, {"x": torch.zeros(2)}
    assert torch.equal(T.tree_where(torch.tensor(True), a, b)["x"], a["x"])
    assert torch.equal(T.tree_where(torch.tensor(False), a, b)["x"], b["x"])
    assert T.tree_all_finite(a)
    assert not T.tree_all_finite({"x": torch.tensor([1.0, float("nan")])})
    assert not T.tree_all_finite({"x": torch.tensor([float("inf")])})


@T.pytree_dataclass
class _Pair:
    first: torch.Tensor
    second: dict
    label: str = T.static_field(default="pair")


def test_pytree_dataclass_is_frozen_and_traversed_by_both_registries():
    pair = _Pair(torch.ones(2), {"a": torch.zeros(3)}, label="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pair.first = torch.zeros(2)  # type: ignore[misc]
    doubled = T.tree_scale(pair, 2.0)
    assert isinstance(doubled, _Pair) and doubled.label == "x"
    assert torch.equal(doubled.first, 2 * torch.ones(2))
    assert len(T.tree_leaves(pair)) == 2


def test_pytree_dataclass_under_vmap_and_grad():
    stacked = _Pair(torch.randn(3, 2), {"a": torch.randn(3, 4)})
    out = vmap(lambda p: _Pair(p.first * 2, {"a": p.second["a"].sum()}, label="y"))(stacked)
    assert isinstance(out, _Pair) and out.label == "y"
    assert torch.equal(out.first, stacked.first * 2)
    assert torch.allclose(out.second["a"], stacked.second["a"].sum(1))
    gradient = grad(lambda p: (p.first ** 2).sum() + p.second["a"].sum())(_Pair(torch.ones(2), {"a": torch.ones(3)}))
    assert isinstance(gradient, _Pair)
    assert torch.equal(gradient.first, 2 * torch.ones(2)) and torch.equal(gradient.second["a"], torch.ones(3))


def test_all_finite_is_exact_when_the_quick_sum_overflows():
    """Large finite entries whose sum overflows are finite; ±Inf pairs whose sum is NaN are not;
    under vmap each member gets its own answer."""
    big = torch.full((4,), 3e38, dtype=torch.float32)
    assert T.tree_all_finite({"x": big})
    assert not T.tree_all_finite({"x": torch.tensor([float("inf"), -float("inf")])})
    members = torch.stack([big, torch.ones(4), torch.tensor([0.0, float("nan"), 0.0, 0.0])])
    flags = torch.func.vmap(lambda x: T.tree_all_finite({"x": x}))(members)
    assert flags.tolist() == [True, True, False]
