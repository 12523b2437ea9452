"""Running averages, ensembles under vmap, and parameters outside supported layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import vmap

import fprecond as fp
from fprecond.curvature import DiagonalBlock, EstimatorState, estimate, estimator
from fprecond.tree import tree_leaves, tree_map, tree_structure

from tests.curvature.references import block_mask, layer_groups
from tests.helpers import (
    stack_trees,
    CASES,
    assert_relative_close,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    make_problem,
)

TOL = 1e-10
KIND_OPTIONS = {
    "hessian": {},
    "ggn": {},
    "fisher": {},
    "fisher_mc": {"samples": 2},
    "empirical_fisher": {},
}


@pytest.mark.parametrize("structure", ["full", "layer", "kron", "unit", "diag"])
def test_estimator_running_average(structure):
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    est = estimator(md, kind="ggn", structure=structure, decay=0.9)
    state = est.init(params)
    assert isinstance(state, EstimatorState)
    assert all(float(leaf.abs().sum()) == 0.0 for leaf in tree_leaves(state.curvature))
    first = est.estimate(params, batch)
    state = est.update(state, params, batch)
    assert tree_structure(state.curvature) == tree_structure(first)
    assert_relative_close(state.curvature.to_dense(), first.to_dense(), TOL)
    moved = tree_map(lambda p: p * 1.1, params)
    second = est.estimate(moved, batch)
    state = est.update(state, moved, batch)
    assert int(state.count) == 2
    expected = first.moving_average(second, 0.9)
    for leaf, reference in zip(tree_leaves(state.curvature), tree_leaves(expected)):
        assert_relative_close(leaf, reference, TOL)


@pytest.mark.parametrize("kind", list(KIND_OPTIONS))
@pytest.mark.parametrize("case", ["cnn", "embedding"])
def test_ensemble_vmap_equals_a_loop(case, kind):
    """Three members with their own parameters and keys, estimated in one vmapped call."""
    structures = ["full", "kron", "unit", "diag"] if kind != "hessian" else ["layer", "diag", "kron"]
    members = [make_problem(case, ("cross_entropy", "mean"), seed=s) for s in range(3)]
    md, _, batch = members[0]
    stacked = stack_trees([params for _, params, _ in members])
    keys = fp.random.split(fp.random.key(7), 3)
    options = KIND_OPTIONS[kind]
    for structure in structures:
        def one(params, key):
            extra = {"key": key} if kind == "fisher_mc" else {}
            return estimate(md, params, batch, kind=kind, structure=structure, approx="reduce", **extra, **options)

        batched = vmap(one)(stacked, keys)
        for index in range(3):
            single = one(members[index][1], keys[index])
            for leaf, reference in zip(tree_leaves(batched), tree_leaves(single)):
                assert_relative_close(leaf[index], reference, TOL)


def test_estimator_update_under_vmap_equals_a_loop():
    members = [make_problem("sequence", ("mse", "mean"), seed=s) for s in range(3)]
    md, _, batch = members[0]
    est = estimator(md, kind="fisher_mc", structure="kron", decay=0.5)
    stacked = stack_trees([params for _, params, _ in members])
    keys = fp.random.split(fp.random.key(1), 3)
    state = vmap(est.init)(stacked)
    step = vmap(lambda s, p, k: est.update(s, p, batch, k))
    state = step(state, stacked, keys)
    state = step(state, stacked, keys)
    for index in range(3):
        single = est.init(members[index][1])
        for _ in range(2):
            single = est.update(single, members[index][1], batch, keys[index])
        assert int(state.count[index]) == int(single.count) == 2
        for leaf, reference in zip(tree_leaves(state.curvature), tree_leaves(single.curvature)):
            assert_relative_close(leaf[index], reference, TOL)


class WithTemperature(nn.Module):
    """A Linear layer followed by a learned per-output scale: the scale is no supported layer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)) * self.temperature


def _temperature_problem(loss_key=("cross_entropy", "mean")):
    torch.manual_seed(0)
    module = WithTemperature().double()
    loss = fp.losses.cross_entropy(loss_key[1]) if loss_key[0] == "cross_entropy" else fp.losses.mse(loss_key[1])
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, generator=g)
    targets = torch.randint(0, 3, (5,), generator=g) if loss_key[0] == "cross_entropy" else torch.randn(5, 3,
                                                                                                          generator=g)
    md = fp.model(module, loss)
    return md, md.params(), (inputs, targets)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_parameters_outside_supported_layers(kind, loss_key):
    md, params, batch = _temperature_problem(loss_key)
    assert md.unsupported == ("temperature",)
    dense = {"hessian": dense_hessian, "ggn": dense_ggn, "empirical_fisher": dense_empirical_fisher}[kind](
        md, params, batch)
    assert_relative_close(estimate(md, params, batch, kind=kind, structure="full").to_dense(), dense, TOL)
    layer = estimate(md, params, batch, kind=kind, structure="layer").to_dense()
    assert_relative_close(layer, dense * block_mask(dense.shape[0], layer_groups(md)), TOL)
    diag = estimate(md, params, batch, kind=kind, structure="diag").to_dense()
    assert_relative_close(diag, torch.diag_embed(dense.diagonal()), TOL)
    kron = estimate(md, params, batch, kind=kind, structure="kron", fallback="diag")
    assert isinstance(kron.blocks[-1], DiagonalBlock)
    assert_relative_close(kron.blocks[-1].diagonal["temperature"], dense.diagonal()[:3], TOL)  # own parameters come first


def test_parameters_outside_supported_layers_need_a_fallback_for_kron():
    md, params, batch = _temperature_problem()
    for structure in ("kron", "unit"):
        with pytest.raises(ValueError, match=f"'ggn'.*'{structure}'.*'temperature'.*fallback='diag'"):
            estimate(md, params, batch, kind="ggn", structure=structure)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"kind": "newton", "structure": "kron"}, "kind must be one of"),
    ({"kind": "ggn", "structure": "blocks"}, "structure must be one of"),
    ({"kind": "ggn", "structure": "kron", "approx": "mean"}, "approx must be one of"),
    ({"kind": "fisher_mc", "structure": "kron"}, "needs an explicit key"),
    ({"kind": "ggn", "structure": "kron", "samples": 4}, "samples=4 only applies"),
    ({"kind": "fisher_mc", "structure": "kron", "samples": 0, "key": fp.random.key(0)}, "positive int"),
    ({"kind": "empirical_fisher", "structure": "kron", "per": "batch"}, "per must be one of"),
])
def test_bad_options_raise_early(arguments, message):
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    with pytest.raises(ValueError, match=message):
        estimate(md, params, batch, **arguments)


def test_estimator_rejects_bad_options_at_construction():
    md, _, _ = make_problem("cnn", ("cross_entropy", "mean"))
    with pytest.raises(ValueError, match="decay"):
        estimator(md, kind="ggn", structure="kron", decay=1.0)
    with pytest.raises(ValueError, match="samples=3 only applies"):
        estimator(md, kind="ggn", structure="kron", samples=3)
    assert set(CASES)  # the shared cases stay importable for the parameterisations above
