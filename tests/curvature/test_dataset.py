"""The summed-loss curvature over a data iterator against dense float64 references.

Exact structures equal the matching blocks of the dense curvature of ``Σ_n ℓ_n``
over all examples (whatever the model's reduction and the batch split); Kronecker
blocks equal brute-force factors with ``A`` averaged over all examples and ``G``
summed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

import fprecond as fp
from fprecond.curvature import estimate
from fprecond.curvature.dataset import dataset_curvature, dataset_statistics
from fprecond.tree import tree_leaves

from tests.curvature.references import block_mask, brute_force_kron, layer_groups
from tests.helpers import (
    assert_relative_close,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    make_problem,
    stack_trees,
)

TOL = 1e-10
SPLIT = (3, 5, 2)  # uneven batches of the 10 examples


def _batches(batch, sizes=SPLIT):
    inputs, targets = batch
    out, start = [], 0
    for size in sizes:
        out.append((inputs[start:start + size], targets[start:start + size]))
        start += size
    return out


def _summed(md: fp.Model) -> fp.Model:
    """The same module with a summed loss, built independently of the code under test."""
    loss = fp.losses.cross_entropy("sum") if isinstance(md.loss, fp.losses.CrossEntropyLoss) else fp.losses.mse("sum")
    return fp.model(md.module, loss)


def _dense(kind: str, md, params, batch) -> torch.Tensor:
    reference = {"hessian": dense_hessian, "ggn": dense_ggn, "empirical_fisher": dense_empirical_fisher}[kind]
    return reference(md, params, batch)


@pytest.mark.parametrize("loss_key", [("cross_entropy", "mean"), ("mse", "mean"), ("cross_entropy", "sum")],
                         ids=["ce-mean", "mse-mean", "ce-sum"])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_exact_structures_equal_dense_summed_curvature(loss_key, kind):
    md, params, batch = make_problem("mlp", loss_key, n=10)
    dense = _dense(kind, _summed(md), params, batch)
    for structure in ("full", "layer", "diag"):
        curvature = dataset_curvature(md, params, _batches(batch), kind=kind, structure=structure)
        if structure == "layer":
            expected = dense * block_mask(dense.shape[0], layer_groups(md))
        elif structure == "diag":
            expected = torch.diag_embed(torch.diagonal(dense))
        else:
            expected = dense
        assert_relative_close(curvature.to_dense(), expected, TOL)


@pytest.mark.parametrize("case_name", ["mlp", "sequence"])
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
def test_kron_factors_average_inputs_and_sum_output_gradients(case_name, kind):
    md, params, batch = make_problem(case_name, ("cross_entropy", "mean"), n=10)
    curvature = dataset_curvature(md, params, _batches(batch), kind=kind, structure="kron")
    for layer, block in zip(md.layers, curvature.blocks):
        a, g = brute_force_kron(_summed(md), params, batch, layer.name, kind, "expand")
        assert_relative_close(block.input_factor[0], a, TOL)
        assert_relative_close(block.output_factor[0], g, TOL)
        assert float(block.damping) == 0.0


def test_kron_is_exact_for_one_example_per_data_set():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=1)
    curvature = dataset_curvature(md, params, [batch], kind="ggn", structure="kron")
    dense = dense_ggn(_summed(md), params, batch)
    assert_relative_close(curvature.to_dense(), dense * block_mask(dense.shape[0], layer_groups(md)), TOL)


def test_summed_loss_and_example_count():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=10)
    stats = dataset_statistics(md, params, iter(_batches(batch)), kind="ggn", structure="diag")
    expected = F.cross_entropy(md.apply(params, batch[0]), batch[1], reduction="sum")
    torch.testing.assert_close(stats.loss, expected.detach(), rtol=1e-12, atol=0.0)
    assert int(stats.examples) == 10 and stats.examples.dtype == torch.int64


def test_fisher_mc_folds_the_key_with_the_batch_index():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=10)
    key = fp.random.key(4)
    batches = _batches(batch)
    curvature = dataset_curvature(md, params, batches, kind="fisher_mc", structure="full", key=key, samples=2)
    # Each batch's mean-loss estimate with its folded key, rescaled by its size.
    expected = sum(len(b[1]) * estimate(md, params, b, kind="fisher_mc", structure="full",
                                        key=fp.random.fold_in(key, index), samples=2).to_dense()
                   for index, b in enumerate(batches))
    assert_relative_close(curvature.to_dense(), expected, TOL)
    other = dataset_curvature(md, params, batches, kind="fisher_mc", structure="full", key=fp.random.key(5), samples=2)
    assert not torch.allclose(other.to_dense(), curvature.to_dense())


def test_ensemble_under_vmap_equals_loop():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=10)
    members = [{k: v + 0.1 * i * torch.ones_like(v) for k, v in params.items()} for i in range(3)]
    batches = _batches(batch)

    def fit(p):
        return dataset_statistics(md, p, batches, kind="ggn", structure="kron")

    looped = stack_trees([fit(p) for p in members])
    batched = vmap(fit)(stack_trees(members))
    for a, b in zip(tree_leaves(batched), tree_leaves(looped), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_bad_arguments_raise():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=4)
    with pytest.raises(ValueError, match="empty"):
        dataset_curvature(md, params, [], kind="ggn", structure="diag")
    with pytest.raises(ValueError, match="lowrank"):
        dataset_curvature(md, params, [batch], kind="empirical_fisher", structure="lowrank")
    with pytest.raises(TypeError, match="one pair"):
        dataset_curvature(md, params, batch, kind="ggn", structure="diag")
    with pytest.raises(ValueError, match="key"):
        dataset_curvature(md, params, [batch], kind="fisher_mc", structure="diag")
    with pytest.raises(ValueError, match="batch 1"):
        dataset_curvature(md, params, [batch, (batch[0][:0], batch[1][:0])], kind="ggn", structure="diag")
