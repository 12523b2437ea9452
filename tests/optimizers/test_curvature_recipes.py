"""Curvature recipes: each first direction against its dense formula, an ensemble
under vmap against a loop, and training on scikit-learn's digits against SGD."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fprecond as fp
from fprecond.layers import flat_index_matrix, form_of
from fprecond.tree import ravel, tree_leaves

from tests.curvature.references import block_mask, brute_force_kron, layer_groups, param_offsets, unit_groups
from tests.helpers import (
    assert_ensemble_matches_loop,
    assert_relative_close,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    make_problem,
    train_digits,
)

LAMBDA = 0.1
TOL = 1e-9
PLAIN = {"learning_rate": 1.0, "momentum": 0.0, "kl_clip": None}


def first_direction(transform, md, params, batch, key=None) -> torch.Tensor:
    """``d`` of the first step, flat: with learning rate 1 and no momentum the update is ``-d``."""
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    updates, _ = transform.update(grads, state, params, batch=batch, key=key)
    return -ravel(updates)[0]


def flat_gradient(md, params, batch) -> torch.Tensor:
    return ravel(fp.loss_and_grads(md, params, batch)[1])[0]


def layer_positions(md, layer) -> torch.Tensor:
    """``(G, O, S)``: the position of each entry of the layer's ``[W | b]`` matrix in the flat parameters."""
    layout = form_of(layer).layout(layer)
    return flat_index_matrix(layout, offset=int(param_offsets(md)[layout.names[0]].min()))


def damped_solve(matrix: torch.Tensor, vector: torch.Tensor, damping: float = LAMBDA) -> torch.Tensor:
    return torch.linalg.solve(matrix + damping * torch.eye(len(matrix)), vector)


# --------------------------------------------------------------------------- dense formulas


@pytest.mark.parametrize("case", ["mlp", "cnn", "sequence", "embedding"])
@pytest.mark.parametrize("kind,structure", [("ggn", "full"), ("ggn", "layer"), ("fisher", "unit"),
                                            ("empirical_fisher", "diag"), ("hessian", "layer")])
def test_natural_gradient_is_the_damped_solve(case, kind, structure):
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    solver = fp.solvers.eigh() if kind == "hessian" else "cholesky"
    transform = fp.natural_gradient(md, kind=kind, structure=structure, solver=solver, damping=LAMBDA, **PLAIN)
    dense = dense_hessian(md, params, batch) if kind == "hessian" else dense_ggn(md, params, batch)
    if kind == "empirical_fisher":
        dense = dense_empirical_fisher(md, params, batch)
    groups = {"full": [torch.arange(len(dense))], "layer": layer_groups(md), "unit": unit_groups(md),
              "diag": [torch.tensor([i]) for i in range(len(dense))]}[structure]
    dense = dense * block_mask(len(dense), groups)
    if kind == "hessian":  # clamped eigenvalues, block by block (the mask keeps blocks apart)
        values, vectors = torch.linalg.eigh(dense)
        dense = vectors @ torch.diag(values.clamp(min=0.0)) @ vectors.T
    expected = damped_solve(dense, flat_gradient(md, params, batch))
    assert_relative_close(first_direction(transform, md, params, batch), expected, TOL)


@pytest.mark.parametrize("pi_damping", [True, False])
def test_kfac_is_the_factored_formula(pi_damping):
    """Per layer ``(G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹`` with ``A``, ``G`` by brute force."""
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    transform = fp.kfac(md, kind="empirical_fisher", damping=LAMBDA, pi_damping=pi_damping, warmup=0, **PLAIN)
    direction = first_direction(transform, md, params, batch)
    gradient = flat_gradient(md, params, batch)
    for layer in md.layers:
        a, g = brute_force_kron(md, params, batch, layer.name, "empirical_fisher", "expand")
        pi = torch.sqrt((torch.trace(a) / len(a)) / (torch.trace(g) / len(g))) if pi_damping else 1.0
        a = a + pi * LAMBDA ** 0.5 * torch.eye(len(a))
        g = g + LAMBDA ** 0.5 / pi * torch.eye(len(g))
        index = layer_positions(md, layer)[0]
        expected = torch.linalg.solve(g, gradient[index]) @ torch.linalg.inv(a)
        assert_relative_close(direction[index], expected, TOL)


def test_ekfac_rescales_the_kronecker_eigenbasis():
    """``Q diag(1/(s + λ)) Qᵀ g`` with ``Q = Q_G ⊗ Q_A`` and ``s = diag(Qᵀ F_l Q)``, ``F_l`` the
    dense empirical Fisher block of the layer."""
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    transform = fp.ekfac(md, kind="empirical_fisher", damping=LAMBDA, **PLAIN)
    direction = first_direction(transform, md, params, batch)
    gradient = flat_gradient(md, params, batch)
    fisher = dense_empirical_fisher(md, params, batch)
    for layer in md.layers:
        a, g = brute_force_kron(md, params, batch, layer.name, "empirical_fisher", "expand")
        basis = torch.kron(torch.linalg.eigh(g)[1], torch.linalg.eigh(a)[1])
        index = layer_positions(md, layer)[0].reshape(-1)
        block = fisher[index[:, None], index[None, :]]
        moments = torch.diagonal(basis.T @ block @ basis)
        expected = basis @ ((basis.T @ gradient[index]) / (moments + LAMBDA))
        assert_relative_close(direction[index], expected, TOL)


@pytest.mark.parametrize("case", ["mlp", "cnn", "sequence"])
def test_smw_ng_is_the_layerwise_empirical_natural_gradient(case):
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    transform = fp.smw_ng(md, example_inputs=batch[0], damping=LAMBDA, **PLAIN)
    fisher = dense_empirical_fisher(md, params, batch) * block_mask(sum(p.numel() for p in params.values()),
                                                                    layer_groups(md))
    expected = damped_solve(fisher, flat_gradient(md, params, batch))
    assert_relative_close(first_direction(transform, md, params, batch), expected, TOL)


def test_seng_sketches_the_batch_and_truncates_shared_layers():
    md, params, batch = make_problem("sequence", ("cross_entropy", "mean"), n=6)
    inputs, targets = batch
    exact = fp.seng(md, example_inputs=inputs, damping=LAMBDA, subsample=3, rank=5, **PLAIN)
    sub = (inputs[:3], targets[:3])
    fisher = dense_empirical_fisher(md, params, sub) * block_mask(sum(p.numel() for p in params.values()),
                                                                  layer_groups(md))
    expected = damped_solve(fisher, flat_gradient(md, params, batch))
    assert_relative_close(first_direction(exact, md, params, batch), expected, TOL)
    truncated = first_direction(fp.seng(md, example_inputs=inputs, damping=LAMBDA, subsample=3, rank=1, **PLAIN),
                                md, params, batch)
    error = (truncated - expected).norm() / expected.norm()
    assert 1e-6 < error < 0.5  # an approximation, and a close one


@pytest.mark.parametrize("eigenvalues", ["clamp", "abs"])
def test_newton_is_the_damped_hessian_solve(eigenvalues):
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    transform = fp.newton(md, damping=LAMBDA, eigenvalues=eigenvalues)
    values, vectors = torch.linalg.eigh(dense_hessian(md, params, batch))
    assert values.min() < 0
    values = values.abs() if eigenvalues == "abs" else values.clamp(min=0.0)
    expected = vectors @ ((vectors.T @ flat_gradient(md, params, batch)) / (values + LAMBDA))
    assert_relative_close(first_direction(transform, md, params, batch), expected, TOL)


def test_newton_solves_a_quadratic_in_one_step():
    torch.manual_seed(0)
    module = nn.Linear(4, 2).double()
    md = fp.model(module, fp.losses.mse("sum"))
    params = md.params()
    batch = (torch.randn(16, 4), torch.randn(16, 2))
    transform = fp.newton(md, damping=1e-12)
    _, grads = fp.loss_and_grads(md, params, batch)
    updates, _ = transform.update(grads, transform.init(params), params, batch=batch)
    after = fp.loss_and_grads(md, fp.apply_updates(params, updates), batch)[1]
    assert ravel(after)[0].norm() < 1e-9 * ravel(grads)[0].norm()


@pytest.mark.parametrize("diagonal_preconditioner", [False, True])
def test_newton_cg_converges_to_the_damped_ggn_solve(diagonal_preconditioner):
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    transform = fp.newton_cg(md, damping=LAMBDA, iterations=300, tol=1e-14, adapt_damping=False,
                             diagonal_preconditioner=diagonal_preconditioner)
    expected = damped_solve(dense_ggn(md, params, batch), flat_gradient(md, params, batch))
    assert_relative_close(first_direction(transform, md, params, batch), expected, 1e-8)


def test_newton_cg_adapts_damping_by_the_reduction_ratio():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    transform = fp.newton_cg(md, damping=1.0, min_damping=1e-6)
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    _, state = transform.update(grads, state, params, batch=batch)
    inner = state.inner_state["precondition"]
    ratio = float(inner.reduction_ratio)
    expected = 1.5 if ratio < 0.25 else (2.0 / 3.0 if ratio > 0.75 else 1.0)
    assert float(inner.damping) == pytest.approx(expected)
    # The ratio is the actual over the predicted loss change of the step taken.
    step = fp.tree.tree_map(lambda u: u, fp.tree.tree_scale(inner.previous, -1.0))
    before = md.batch_loss(params, batch)
    after = md.batch_loss(fp.apply_updates(params, step), batch)
    ggn_step = fp.ggn_vp(md, params, batch, step)
    predicted = fp.tree.tree_vdot(grads, step) + 0.5 * fp.tree.tree_vdot(step, ggn_step)
    assert ratio == pytest.approx(float((after - before) / predicted), rel=1e-10)


# --------------------------------------------------------------------------- ensembles


def recipe_factories(inputs: torch.Tensor):
    return {
        "natural_gradient": lambda md: fp.natural_gradient(md, kind="ggn", structure="layer"),
        "kfac": lambda md: fp.kfac(md, inverse_every=2, warmup=0),
        "ekfac": lambda md: fp.ekfac(md, basis_every=2),
        "unit_wise_ng": lambda md: fp.unit_wise_ng(md),
        "diag_ng": lambda md: fp.diag_ng(md),
        "smw_ng": lambda md: fp.smw_ng(md, example_inputs=inputs),
        "seng": lambda md: fp.seng(md, example_inputs=inputs, subsample=2),
        "newton": lambda md: fp.newton(md, structure="layer"),
        "newton_cg": lambda md: fp.newton_cg(md),
    }


@pytest.mark.parametrize("name", list(recipe_factories(torch.zeros(1))))
def test_ensemble_under_vmap_equals_loop(name):
    # 16 examples: full-rank factors, so eigenbases are unique up to sign (EKFAC's
    # moments in a degenerate eigenspace would depend on the eigensolver's choice).
    md, _, batch = make_problem("mlp", ("cross_entropy", "mean"), n=16)
    transform = recipe_factories(batch[0])[name](md)
    members = [make_problem("mlp", ("cross_entropy", "mean"), seed=s)[1] for s in range(3)]
    assert_ensemble_matches_loop(md, transform, members, batch, key=fp.random.key(5), steps=3)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def sgd_loss() -> float:
    return train_digits(lambda md, inputs: fp.sgd(0.1, momentum=0.9))


TRAINING = {
    "natural_gradient": lambda md, inputs: fp.natural_gradient(md),
    "kfac": lambda md, inputs: fp.kfac(md),
    "ekfac": lambda md, inputs: fp.ekfac(md),
    "unit_wise_ng": lambda md, inputs: fp.unit_wise_ng(md),
    "diag_ng": lambda md, inputs: fp.diag_ng(md),
    "smw_ng": lambda md, inputs: fp.smw_ng(md, example_inputs=inputs),
    "seng": lambda md, inputs: fp.seng(md, example_inputs=inputs),
    "newton": lambda md, inputs: fp.newton(md, structure="layer"),
    "newton_cg": lambda md, inputs: fp.newton_cg(md),
}


@pytest.mark.parametrize("name", list(TRAINING))
def test_recipe_trains_digits_below_sgd(name, sgd_loss):
    """Default settings, same initialisation, batches and step count as SGD (lr 0.1, momentum 0.9)."""
    loss = train_digits(TRAINING[name])
    assert loss < sgd_loss, f"{name}: {loss:.4f} vs SGD {sgd_loss:.4f}"


@pytest.mark.parametrize("rank", [1, 2, 3, 16])
def test_seng_state_keeps_its_shapes_for_any_rank(rank):
    """The truncation keeps at most min(rank, O, S) terms (the CNN's conv has O = 3)."""
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    transform = fp.seng(md, example_inputs=batch[0], rank=rank, subsample=3)
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    _, after = transform.update(grads, state, params, batch=batch)
    assert [x.shape for x in tree_leaves(state)] == [x.shape for x in tree_leaves(after)]
    assert int(after.skipped) == 0


@pytest.mark.parametrize("recipe,groups_of", [(fp.unit_wise_ng, unit_groups),
                                              (fp.diag_ng, lambda md: None)])
@pytest.mark.parametrize("case", ["mlp", "cnn", "embedding"])
def test_unit_wise_and_diagonal_recipes(recipe, groups_of, case):
    """The recipes themselves (not only natural_gradient): damped solves with the unit-wise
    blocks or the diagonal of the empirical Fisher."""
    md, params, batch = make_problem(case, ("cross_entropy", "mean"))
    transform = recipe(md, kind="empirical_fisher", damping=LAMBDA, **PLAIN)
    fisher = dense_empirical_fisher(md, params, batch)
    groups = groups_of(md)
    fisher = torch.diag(torch.diagonal(fisher)) if groups is None else fisher * block_mask(len(fisher), groups)
    expected = damped_solve(fisher, flat_gradient(md, params, batch))
    assert_relative_close(first_direction(transform, md, params, batch), expected, TOL)
