"""Parameter importance: curvature diagonals against dense matrices, OBD saliency against the
actual loss change of removing a weight (error of third order), pruning masks against a
brute-force ranking, and vmap over an ensemble against a loop."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond.importance import (
    apply_mask,
    block_saliency,
    curvature_diagonal,
    layer_saliency,
    magnitude_saliency,
    mask_sparsity,
    prune_mask,
    saliency,
)
from fprecond.tree import ravel

from tests.helpers import dense_ggn, dense_hessian, make_problem, stack_trees


def flat(tree) -> torch.Tensor:
    return ravel(tree)[0]


def trained_problem(steps: int = 60):
    """The tiny float64 MLP after ``steps`` Adam steps on its 24-example batch (not a
    minimum: the gradient term of the saliency still matters)."""
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=24, seed=4)
    optimizer = fp.adam(0.05)
    state = optimizer.init(params)
    for _ in range(steps):
        _, grads = fp.loss_and_grads(md, params, batch)
        updates, state = optimizer.update(grads, state, params)
        params = fp.apply_updates(params, updates)
    return md, params, batch


# --------------------------------------------------------------------------- diagonals


@pytest.mark.parametrize("case", ["mlp", "cnn", "embedding"])
@pytest.mark.parametrize("structure", ["diag", "kron", "unit", "layer", "full"])
def test_curvature_diagonal_is_the_dense_diagonal(case, structure):
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    curvature = fp.curvature.estimate(md, params, batch, kind="ggn", structure=structure).damped(0.1)
    diagonal = curvature_diagonal(curvature)
    assert list(diagonal) == list(params) and all(diagonal[n].shape == p.shape for n, p in params.items())
    torch.testing.assert_close(flat(diagonal), torch.diagonal(curvature.to_dense()), rtol=1e-12, atol=1e-14)


def test_diagonal_of_eigenbasis_and_low_rank_blocks():
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    kron = fp.curvature.estimate(md, params, batch, kind="ggn", structure="kron").damped(0.1)
    eigen = kron.power(1.0)  # Kronecker eigenbasis blocks
    torch.testing.assert_close(flat(curvature_diagonal(eigen)), torch.diagonal(kron.to_dense()), rtol=1e-10,
                               atol=1e-13)
    low_rank = fp.curvature.estimate(md, params, batch, kind="empirical_fisher", structure="lowrank").damped(0.1)
    reference = torch.diagonal(fp.curvature.estimate(md, params, batch, kind="empirical_fisher",
                                                     structure="full").to_dense()) + 0.1
    torch.testing.assert_close(flat(curvature_diagonal(low_rank)), reference, rtol=1e-10, atol=1e-13)


def test_diagonals_against_dense_hessian_and_ggn():
    """Independent references: autograd's dense Hessian and Jᵀ H J; Kronecker factors are
    exact for one example without weight sharing, so their diagonal is the GGN's."""
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=5)
    hessian = fp.curvature.estimate(md, params, batch, kind="hessian", structure="diag")
    torch.testing.assert_close(flat(curvature_diagonal(hessian)), torch.diagonal(dense_hessian(md, params, batch)),
                               rtol=1e-10, atol=1e-13)
    ggn = fp.curvature.estimate(md, params, batch, kind="ggn", structure="diag")
    torch.testing.assert_close(flat(curvature_diagonal(ggn)), torch.diagonal(dense_ggn(md, params, batch)),
                               rtol=1e-10, atol=1e-13)
    one = (batch[0][:1], batch[1][:1])
    kron = fp.curvature.estimate(md, params, one, kind="ggn", structure="kron")
    torch.testing.assert_close(flat(curvature_diagonal(kron)), torch.diagonal(dense_ggn(md, params, one)),
                               rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- saliency


def removal_errors(md, params, batch, diagonal, grads, epsilon):
    """For every entry ``i``: |L(θ − ε θ_i e_i) − L(θ) − s_i(ε θ)|, with ``s`` the saliency of
    removing ``ε θ_i`` (``−ε g_i θ_i + ½ ε² h_ii θ_i²``)."""
    theta, unravel = ravel(params)
    base = md.batch_loss(params, batch)
    predicted = flat(saliency(diagonal, {n: epsilon * p for n, p in params.items()}, grads))
    steps = -epsilon * torch.diag(theta)  # row i removes ε θ_i
    actual = torch.stack([md.batch_loss(unravel(theta + step), batch) for step in steps]) - base
    return (actual - predicted).abs(), actual


def test_saliency_is_the_loss_change_of_removing_a_weight_to_second_order():
    md, params, batch = trained_problem()
    hessian = fp.curvature.estimate(md, params, batch, kind="hessian", structure="diag")
    _, grads = fp.loss_and_grads(md, params, batch)
    diagonal = curvature_diagonal(hessian)
    large, actual = removal_errors(md, params, batch, diagonal, grads, 0.01)
    small, _ = removal_errors(md, params, batch, diagonal, grads, 0.005)
    # The error is of third order: halving the removed amount divides it by 8. Entries whose
    # third-order term is tiny (errors near round-off, or dominated by the fourth order) are
    # left out of the per-entry bound, not of the median.
    ratio = large / small
    clear = large > 1e-10
    assert int(clear.sum()) >= 0.75 * clear.numel()
    assert bool((ratio[clear] > 7.0).all() and (ratio[clear] < 9.0).all()), ratio[clear]
    assert 7.5 < float(ratio.median()) < 8.5
    assert float(large.max()) < 1e-2 * float(actual.abs().max())
    # the full removal (ε = 1) from the exact Hessian diagonal: saliency = ½ h θ² − g θ
    full = saliency(hessian, params, grads)
    expected = 0.5 * flat(diagonal) * flat(params).square() - flat(grads) * flat(params)
    torch.testing.assert_close(flat(full), expected, rtol=1e-14, atol=1e-16)
    # the Curvature and its diagonal pytree give the same saliency
    torch.testing.assert_close(flat(saliency(diagonal, params, grads)), flat(full), rtol=0, atol=0)


def test_block_saliency_is_the_loss_change_of_removing_a_layer():
    md, params, batch = trained_problem()
    exact = fp.curvature.estimate(md, params, batch, kind="hessian", structure="layer")
    _, grads = fp.loss_and_grads(md, params, batch)
    base = md.batch_loss(params, batch)
    for layer in md.layers:
        errors = []
        for epsilon in (0.02, 0.01):
            scaled = {n: epsilon * params[n] if n in layer.param_names else params[n] for n in params}
            removed = {n: params[n] - epsilon * params[n] if n in layer.param_names else params[n] for n in params}
            predicted = block_saliency(exact, scaled, grads)[layer.name]
            errors.append(abs(float(md.batch_loss(removed, batch) - base - predicted)))
        assert 7.0 < errors[0] / errors[1] < 9.0, errors


def test_block_saliency_of_kron_and_diag_blocks():
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    kron = fp.curvature.estimate(md, params, batch, kind="ggn", structure="kron")
    dense = kron.to_dense()
    offsets = torch.cumsum(torch.tensor([0] + [p.numel() for p in params.values()]), 0)
    position = {name: (int(offsets[i]), int(offsets[i + 1])) for i, name in enumerate(params)}
    values = block_saliency(kron, params)
    assert list(values) == [layer.name for layer in md.layers]
    theta = flat(params)
    for layer in md.layers:
        index = torch.cat([torch.arange(*position[name]) for name in layer.param_names])
        expected = 0.5 * theta[index] @ dense[index][:, index] @ theta[index]
        torch.testing.assert_close(values[layer.name], expected, rtol=1e-12, atol=0)
    diag = fp.curvature.estimate(md, params, batch, kind="ggn", structure="diag")
    per_tensor = layer_saliency(saliency(diag, params))
    assert list(per_tensor) == list(params)
    per_layer = layer_saliency(saliency(diag, params), md)
    by_block = block_saliency(diag, params)  # a diagonal block per layer: no cross terms
    assert list(per_layer) == list(by_block) == ["0", "3"]
    for layer in md.layers:
        expected = sum(0.5 * (curvature_diagonal(diag)[n] * params[n].square()).sum() for n in layer.param_names)
        torch.testing.assert_close(per_layer[layer.name], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(by_block[layer.name], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(per_tensor[layer.weight] + per_tensor[layer.bias], expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- masks


def brute_force_keep(values: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Python ranking: remove the round(fraction·n) smallest entries (earlier entry first on ties)."""
    entries = [(float(v), t, i) for t, tensor in enumerate(values) for i, v in enumerate(tensor.reshape(-1).tolist())]
    removed = {(t, i) for _, t, i in sorted(entries)[:round(fraction * len(entries))]}
    return [torch.tensor([(t, i) not in removed for i in range(tensor.numel())]).reshape(tensor.shape)
            for t, tensor in enumerate(values)]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.75, 1.0])
def test_prune_mask_removes_the_least_important_entries(fraction):
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    diag = fp.curvature.estimate(md, params, batch, kind="ggn", structure="diag")
    scores = saliency(diag, params)
    weights = [name for name in params if name.endswith("weight")]
    globally = prune_mask(scores, fraction, names=weights)
    expected = brute_force_keep([scores[n] for n in weights], fraction)
    for name, keep in zip(weights, expected):
        assert torch.equal(globally[name], keep), name
    assert all(bool(globally[n].all()) for n in params if n not in weights)  # biases untouched
    per_layer = prune_mask(scores, fraction, scope="layer")
    for name in params:
        assert torch.equal(per_layer[name], brute_force_keep([scores[name]], fraction)[0]), name
        assert int((~per_layer[name]).sum()) == round(fraction * params[name].numel())
    pruned = apply_mask(params, per_layer)
    for name in params:
        assert torch.equal(pruned[name], torch.where(per_layer[name], params[name], 0.0))
    total = sum(p.numel() for p in params.values())
    assert float(mask_sparsity(per_layer)) == sum(round(fraction * p.numel()) for p in params.values()) / total


def test_ties_and_magnitude():
    values = {"a": torch.tensor([1.0, -1.0, 0.5, 1.0]), "b": torch.tensor([[2.0, -0.5]])}
    magnitude = magnitude_saliency(values)
    mask = prune_mask(magnitude, 0.5)  # 3 of 6: 0.5 (a), -0.5 (b), then the first 1.0 of a
    assert mask["a"].tolist() == [False, True, False, True] and mask["b"].tolist() == [[True, False]]


def test_previous_mask_stays_removed_and_counts():
    scores = {"a": torch.tensor([5.0, 1.0, 4.0, 2.0]), "b": torch.tensor([3.0, 6.0])}
    first = prune_mask(scores, 0.25, names=["a"])  # removes a[1]
    assert first["a"].tolist() == [True, False, True, True]
    rescored = {"a": torch.tensor([5.0, 9.0, 0.5, 2.0]), "b": torch.tensor([0.1, 6.0])}
    second = prune_mask(rescored, 0.5, names=["a"], previous=first)  # a[1] again, then a[2]
    assert second["a"].tolist() == [True, False, False, True] and bool(second["b"].all())
    outside = prune_mask(rescored, 0.0, names=["a"], previous={"a": first["a"], "b": torch.tensor([False, True])})
    assert outside["b"].tolist() == [False, True] and outside["a"].tolist() == first["a"].tolist()


def test_ensemble_under_vmap_equals_loop():
    md, base, batch = make_problem("mlp", ("cross_entropy", "mean"))
    members = [{n: p + 0.2 * k * torch.randn(p.shape, generator=torch.Generator().manual_seed(k))
                for n, p in base.items()} for k in range(3)]

    def pruned(params):
        kron = fp.curvature.estimate(md, params, batch, kind="ggn", structure="kron")
        _, grads = fp.loss_and_grads(md, params, batch)
        scores = saliency(kron, params, grads)
        return apply_mask(params, prune_mask(scores, 0.4)), block_saliency(kron, params, grads)

    batched = vmap(pruned)(stack_trees(members))
    looped = stack_trees([pruned(p) for p in members])
    for a, b in zip(ravel(batched[0])[0], ravel(looped[0])[0]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(flat(batched[1]), flat(looped[1]), rtol=1e-8, atol=1e-12)


def test_bad_arguments_raise():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    diag = fp.curvature.estimate(md, params, batch, kind="ggn", structure="diag")
    scores = saliency(diag, params)
    with pytest.raises(ValueError, match="fraction"):
        prune_mask(scores, 1.5)
    with pytest.raises(ValueError, match="scope"):
        prune_mask(scores, 0.5, scope="unit")
    with pytest.raises(ValueError, match="names"):
        prune_mask(scores, 0.5, names=["0.weight", "nope"])
    with pytest.raises(TypeError, match="names"):
        prune_mask(scores, 0.5, names="0.weight")
    with pytest.raises(ValueError, match="params must be a dict"):
        saliency(diag, {"0.weight": params["0.weight"]})
    with pytest.raises(ValueError, match="shape"):
        saliency({n: d[..., :1] for n, d in curvature_diagonal(diag).items()}, params)
    with pytest.raises(ValueError, match="grads"):
        saliency(diag, params, {"0.weight": params["0.weight"]})
    with pytest.raises(TypeError, match="Curvature"):
        curvature_diagonal(params)
    with pytest.raises(ValueError, match="masks"):
        apply_mask(params, {"0.weight": torch.ones(5, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="model's parameters"):
        layer_saliency({"x": torch.ones(2)}, md)
