"""Kronecker factors: exact where the math is exact, equal to brute-force loops and
to curvlinops-for-pytorch's KFAC elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fprecond as fp
from fprecond.curvature import KroneckerBlock, UnitBlock, estimate

from tests.curvature.references import block_mask, brute_force_kron, layer_groups
from tests.helpers import (
    assert_relative_close,
    dense_ggn,
    dense_hessian,
    make_problem,
    make_targets,
    reference_loss,
    require_peer,
)

TOL = 1e-10


def _single_linear(loss_key, n: int, seed: int = 0):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 3)).double()
    loss = {"cross_entropy": fp.losses.cross_entropy, "mse": fp.losses.mse}[loss_key[0]](loss_key[1])
    g = torch.Generator().manual_seed(seed + 1)
    batch = (torch.randn(n, 4, generator=g), make_targets(loss, n, (3,), g))
    md = fp.model(module, loss)
    return md, md.params(), batch


@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher"])
def test_kron_is_exact_for_one_linear_layer_and_one_example(loss_key, kind):
    md, params, batch = _single_linear(loss_key, n=1)
    expected = dense_ggn(md, params, batch) if kind != "empirical_fisher" else None
    if expected is None:
        expected = estimate(md, params, batch, kind=kind, structure="full").to_dense()
    assert_relative_close(estimate(md, params, batch, kind=kind, structure="kron").to_dense(), expected, TOL)


def test_kron_is_not_exact_for_several_examples():
    """A check that can fail: with N > 1 the Kronecker factorisation is an approximation."""
    md, params, batch = _single_linear(("cross_entropy", "mean"), n=5)
    kron = estimate(md, params, batch, kind="ggn", structure="kron").to_dense()
    exact = dense_ggn(md, params, batch)
    assert (kron - exact).norm() > 1e-3 * exact.norm()


def test_hessian_kron_is_exact_per_layer_for_one_example(loss_key):
    """A Linear layer's Hessian block is Σ_n ∂²L/∂z_n² ⊗ ã_n ã_nᵀ: exact for N = 1."""
    md, params, batch = make_problem("mlp", loss_key, n=1)
    dense = dense_hessian(md, params, batch)
    expected = dense * block_mask(dense.shape[0], layer_groups(md))
    assert_relative_close(estimate(md, params, batch, kind="hessian", structure="kron").to_dense(), expected, TOL)


@pytest.mark.parametrize("case", ["cnn", "sequence"])
def test_hessian_kron_reduce_of_the_output_layer_equals_the_ggn(case):
    """At the last layer the loss Hessian w.r.t. its output is the GGN's, so the reduce
    factors agree (with one loss term per example, where the GGN's separate terms and the
    Hessian's sum over pairs of positions coincide)."""
    md, params, (inputs, targets) = make_problem(case, ("cross_entropy", "mean"))
    if case == "sequence":
        inputs, targets = inputs[:, :1], targets[:, :1]
    batch = (inputs, targets)
    hessian = estimate(md, params, batch, kind="hessian", structure="kron", approx="reduce")
    ggn = estimate(md, params, batch, kind="ggn", structure="kron", approx="reduce")
    assert_relative_close(hessian.blocks[-1].dense(), ggn.blocks[-1].dense(), TOL)
    # Earlier layers differ: the Hessian keeps the activations' second derivatives.
    assert (hessian.blocks[0].dense() - ggn.blocks[0].dense()).norm() > 1e-6 * ggn.blocks[0].dense().norm()


def _reference_output_hessian(md, params, batch, module: nn.Module) -> torch.Tensor:
    """``∂²L/∂z²`` for the output ``z`` of ``module`` by plain autograd, as ``(N, P, U, N, P, U)``."""
    inputs, targets = batch
    shapes = []
    handle = module.register_forward_hook(lambda m, a, out: shapes.append(out.shape))
    md.apply(params, inputs)
    handle.remove()

    def loss_of(perturbation):
        hook = module.register_forward_hook(lambda m, a, out: out + perturbation)
        try:
            return reference_loss(md.loss, md.apply(params, inputs), targets)
        finally:
            hook.remove()

    hessian = torch.autograd.functional.hessian(loss_of, torch.zeros(shapes[0]))
    if isinstance(module, nn.Conv2d):  # (N, C, H, W) -> (N, H·W, C)
        n, c = shapes[0][:2]
        hessian = hessian.reshape(n, c, -1, n, c, shapes[0][2:].numel())
        return hessian.permute(0, 2, 1, 3, 5, 4)
    n, d = shapes[0][0], shapes[0][-1]
    return hessian.reshape(n, -1, d, n, shapes[0][1:-1].numel(), d)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", ["sequence", "cnn", "embedding"])
def test_hessian_kron_output_factor_with_weight_sharing(case, approx):
    """``G`` sums the exact Hessian w.r.t. the layer output over examples and positions
    (expand: position-diagonal blocks; reduce: all pairs of positions)."""
    md, params, batch = make_problem(case, ("cross_entropy", "mean"), n=3)
    curvature = estimate(md, params, batch, kind="hessian", structure="kron", approx=approx)
    checked = 0
    for layer, block in zip(md.layers, curvature.blocks):
        if not isinstance(block, KroneckerBlock):
            continue
        h = _reference_output_hessian(md, params, batch, layer.module)  # (N, P, U, N, P, U)
        n = h.shape[0]
        per_example = torch.stack([h[i, :, :, i] for i in range(n)])  # (N, P, U, P, U)
        if approx == "expand":
            expected = torch.einsum("npupv->uv", per_example)
        else:
            expected = torch.einsum("npuqv->uv", per_example)
        assert_relative_close(block.output_factor[0], expected, TOL)
        a, _ = brute_force_kron(md, params, batch, layer.name, "ggn", approx)
        assert_relative_close(block.input_factor[0], a, TOL)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
def test_kron_factors_equal_brute_force_loops(case_name, loss_key, kind, approx):
    md, params, batch = make_problem(case_name, loss_key, n=3)
    curvature = estimate(md, params, batch, kind=kind, structure="kron", approx=approx)
    checked = 0
    for layer, block in zip(md.layers, curvature.blocks):
        if isinstance(block, UnitBlock):  # norm layers use exact unit-wise blocks
            continue
        assert isinstance(block, KroneckerBlock)
        a, g = brute_force_kron(md, params, batch, layer.name, kind, approx)
        assert_relative_close(block.input_factor[0], a, TOL)
        assert_relative_close(block.output_factor[0], g, TOL)
        checked += 1
    assert checked >= 1


class _ChannelsSecond(nn.Module):
    """curvlinops expects cross-entropy sequence outputs as (N, C, T)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).transpose(1, 2)


@pytest.mark.parametrize(("case", "approx"), [("mlp", "expand"), ("cnn", "expand"), ("cnn", "reduce"),
                                              ("sequence", "expand")])
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
def test_kron_matches_curvlinops(case, approx, kind, loss_key):
    """Equal to curvlinops' KFAC (bias folded in). Reduce is compared only where each example
    has one loss term: curvlinops' type-2 reduce backpropagates all terms together."""
    curvlinops = require_peer("curvlinops")
    md, params, (inputs, targets) = make_problem(case, loss_key, n=5)
    loss_name, reduction = loss_key
    torch_loss = (nn.CrossEntropyLoss if loss_name == "cross_entropy" else nn.MSELoss)(reduction=reduction)
    peer_model = md.module
    if case == "sequence" and loss_name == "cross_entropy":
        peer_model = _ChannelsSecond(md.module)
    fisher_type = {"ggn": "type-2", "empirical_fisher": "empirical"}[kind]
    operator = curvlinops.KFACLinearOperator(
        peer_model, torch_loss, list(md.module.parameters()), [(inputs, targets)], fisher_type=fisher_type,
        kfac_approx=approx, separate_weight_and_bias=False, check_deterministic=False)
    expected = operator @ torch.eye(operator.shape[1], dtype=torch.float64)
    ours = estimate(md, params, (inputs, targets), kind=kind, structure="kron", approx=approx).to_dense()
    assert_relative_close(ours, torch.as_tensor(expected), 1e-9)


def test_pi_damping_matches_its_formula():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    block = estimate(md, params, batch, kind="ggn", structure="kron").blocks[0]
    damping = 1e-2
    a, g = block.input_factor[0], block.output_factor[0]
    pi = torch.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    expected = torch.kron(g + (damping ** 0.5 / pi) * torch.eye(g.shape[0]), a + (pi * damping ** 0.5) * torch.eye(a.shape[0]))
    damped = block.damped(damping, pi=True)
    assert_relative_close(torch.kron(damped.output_factor[0], damped.input_factor[0]), expected, TOL)
    assert_relative_close(block.damped(damping).dense(), block.dense() + damping * torch.eye(block.size), TOL)
