"""Fault injection for every recipe: non-finite gradients at chosen steps, zero and
extremely scaled gradients, a batch with NaN inputs, singular and indefinite
curvature, failed Cholesky factorisations, and one failing member of an ensemble.

What each test asserts is what the library guarantees: no parameter ever becomes
NaN/Inf; a step whose gradient or update is not finite is skipped (zero update,
state kept) and counted in ``state.skipped``; a curvature estimate with NaN/Inf
entries is rejected and counted (``rejected``); a failed factorisation falls back
(more damping, then an eigendecomposition) and is counted (``failures``); training
continues afterwards. See :mod:`tests.reliability.cases` for the recipes.
"""

from __future__ import annotations

import pytest
import torch

import fprecond as fp
from fprecond.transforms.precision import with_precision
from fprecond.tree import tree_all_finite, tree_leaves, tree_map

from tests.helpers import (assert_ensemble_matches_loop, assert_gradient_ensemble_matches_loop, dense_hessian,
                           stack_trees)
from tests.reliability.cases import RECIPES, Problem, RecipeCase, assert_finite_like, counters, tiny_problem, total

KEY = fp.random.key(11)
BATCH_RECIPES = [name for name, case in RECIPES.items() if "batch" in case.extras]


def _run(case: RecipeCase, problem: Problem, steps: int, *, settings: dict | None = None,
         fault=None) -> tuple[dict, object, list[dict]]:
    """``steps`` steps of ``case`` on ``problem``; ``fault(step, grads, batch) -> (grads, batch)``
    may corrupt the inputs of a step. Returns the final params and state and, per step,
    the update, the parameters before it, and the states before and after it."""
    transform = case.make(problem.model, problem.batch[0], **(settings or {}))
    params = problem.params
    state = transform.init(params)
    history = []
    for step in range(steps):
        _, grads = fp.loss_and_grads(problem.model, params, problem.batch)
        batch = problem.batch
        if fault is not None:
            grads, batch = fault(step, grads, batch)
        updates, new_state = transform.update(grads, state, params, batch=batch, key=KEY)
        history.append({"updates": updates, "params": params, "before": state, "after": new_state})
        params, state = fp.apply_updates(params, updates), new_state
        assert bool(tree_all_finite(params)), f"step {step}: non-finite parameters"
    return params, state, history


def _is_zero(tree) -> bool:
    return all(bool((leaf == 0).all()) for leaf in tree_leaves(tree))


def _same_state(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


# --------------------------------------------------------------------------- non-finite gradients


def _poison(grads: dict, how: str) -> dict:
    names = list(grads)
    poisoned = dict(grads)
    if how == "nan":  # one entry of the first tensor
        first = grads[names[0]].clone()
        first.view(-1)[0] = float("nan")
        poisoned[names[0]] = first
    else:  # every entry of the last tensor
        poisoned[names[-1]] = torch.full_like(grads[names[-1]], float(how))
    return poisoned


@pytest.mark.parametrize("name", list(RECIPES))
def test_non_finite_gradients_skip_the_step_and_are_counted(name):
    """NaN at step 2, +Inf at step 4, -Inf at step 5 of 8: those steps leave the parameters
    and the inner state as they were and count one skip each; the others train on."""
    case = RECIPES[name]
    problem = tiny_problem("mlp", dtype="float64")
    faults = {2: "nan", 4: "inf", 5: "-inf"}

    def fault(step, grads, batch):
        return (_poison(grads, faults[step]) if step in faults else grads), batch

    params, state, history = _run(case, problem, 8, fault=fault)
    for step, record in enumerate(history):
        skipped = int(record["after"].skipped) - int(record["before"].skipped)
        if step in faults:
            assert skipped == 1 and _is_zero(record["updates"]), step
            assert _same_state(record["after"].inner_state, record["before"].inner_state), step
            assert int(record["after"].consecutive_skipped) == (2 if step == 5 else 1)
        else:
            assert skipped == 0, step
            assert_finite_like(record["updates"], record["params"])
    assert int(state.skipped) == len(faults)
    assert float(problem.loss(params)) < float(problem.loss(problem.params))


@pytest.mark.parametrize("name", ["adam", "shampoo", "kfac"])
def test_one_member_s_nan_gradient_skips_only_its_step(name):
    """Under vmap a NaN gradient of member 1 at step 1 skips that member's step only."""
    problem = tiny_problem("mlp", dtype="float64")
    case = RECIPES[name]
    members = [tree_map(lambda p, s=scale: p * s, problem.params) for scale in (1.0, 0.7, 1.3)]
    member_grads = []
    for index, member in enumerate(members):
        _, grads = fp.loss_and_grads(problem.model, member, problem.batch)
        steps = [grads, _poison(grads, "nan") if index == 1 else grads, grads]
        member_grads.append(steps)
    if "batch" in case.extras:  # model-driven: the NaN goes in through the gradient only
        transform = case.make(problem.model, problem.batch[0])

        def train(params, grads):
            state = transform.init(params)
            for g in grads:
                updates, state = transform.update(g, state, params, batch=problem.batch, key=KEY)
                params = fp.apply_updates(params, updates)
            return params, state

        looped = stack_trees([train(p, g) for p, g in zip(members, member_grads)])
        batched = torch.func.vmap(train)(stack_trees(members), [stack_trees([g[s] for g in member_grads])
                                                                for s in range(3)])
        for a, b in zip(tree_leaves(batched), tree_leaves(looped), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    else:
        # Shampoo's default ε = 1e-12 on rank-deficient statistics makes the root amplify
        # rounding by far more than 1e8; a larger ε keeps the comparison about the skip.
        settings = {"epsilon": 1e-6} if name == "shampoo" else {}
        batched, _ = assert_gradient_ensemble_matches_loop(case.make(problem.model, problem.batch[0], **settings),
                                                           members, member_grads)
    assert batched[1].skipped.tolist() == [0, 1, 0]


# --------------------------------------------------------------------------- zero and extreme gradients


@pytest.mark.parametrize("factor", [0.0, 1e-30, 1e30])
@pytest.mark.parametrize("name", list(RECIPES))
def test_zero_and_extremely_scaled_gradients_in_float32(name, factor):
    """Gradients times 0, 1e-30 and 1e30 in float32 for 3 steps: finite updates, nothing
    skipped; zero gradients give a zero step (weight decay off), scaled ones a step."""
    case = RECIPES[name]
    problem = tiny_problem("mlp", dtype="float32")
    settings = case.no_weight_decay if factor == 0.0 else {}
    _, state, history = _run(case, problem, 3, settings=settings,
                             fault=lambda step, grads, batch: (tree_map(lambda g: g * factor, grads), batch))
    for record in history:
        assert_finite_like(record["updates"], record["params"])
    assert int(state.skipped) == 0
    moved = [not _is_zero(record["updates"]) for record in history]
    assert not any(moved) if factor == 0.0 else any(moved), moved


@pytest.mark.parametrize("name", ["adam", "adamw", "muon"])
def test_adam_steps_do_not_depend_on_the_gradient_scale(name):
    """Adam's (and Muon's) direction is invariant to the gradient's scale: a float32 gradient
    of 1e30 (whose square overflows) gives the steps of the unscaled one."""
    case = RECIPES[name]
    problem = tiny_problem("cnn", dtype="float32")
    _, _, plain = _run(case, problem, 3)
    _, _, huge = _run(case, problem, 3, fault=lambda step, grads, batch: (tree_map(lambda g: g * 1e30, grads),
                                                                          batch))
    for a, b in zip(plain, huge):
        for name_, update in a["updates"].items():
            torch.testing.assert_close(b["updates"][name_], update, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["shampoo", "soap", "sophia"])
def test_huge_float32_gradients_give_learning_rate_sized_steps(name):
    """Shampoo (Adam-grafted), SOAP (Adam in an eigenbasis) and Sophia (clipped) keep
    learning-rate-sized steps for a float32 gradient of 1e30: the statistics updates that
    overflow are rejected and counted instead of freezing the factors at infinity."""
    case = RECIPES[name]
    problem = tiny_problem("mlp", dtype="float32")
    rate = case.defaults["learning_rate"]
    _, state, history = _run(case, problem, 4, settings={**case.every_step, **case.no_weight_decay},
                             fault=lambda step, grads, batch: (tree_map(lambda g: g * 1e30, grads), batch))
    for record in history[1:]:  # SOAP's first step is zero by design
        largest = max(float(u.abs().max()) for u in record["updates"].values())
        # Grafting gives each tensor the norm of Adam's step: single entries may exceed lr.
        assert 1e-3 * rate < largest <= 10.0 * rate, largest
    if name != "sophia":
        assert total(counters(state), "rejected") > 0
        for leaf in tree_leaves(state.inner_state):
            assert bool(torch.isfinite(leaf).all())


# --------------------------------------------------------------------------- bad batches


@pytest.mark.parametrize("name", BATCH_RECIPES)
def test_a_batch_with_nan_inputs_is_rejected_or_skipped(name):
    """Step 1 sees a batch whose inputs are NaN (its gradient is the good batch's, so only
    the curvature sees the fault): the estimate is rejected and counted and the step
    uses the previous curvature, or the whole step is skipped and counted. Four more
    steps on the good batch add no skip and no rejection, and the loss goes down."""
    case = RECIPES[name]
    problem = tiny_problem("mlp", dtype="float64")
    bad_inputs = torch.full_like(problem.batch[0], float("nan"))

    def fault(step, grads, batch):
        return grads, ((bad_inputs, batch[1]) if step == 1 else batch)

    params, state, history = _run(case, problem, 6, settings=case.every_step, fault=fault)
    bad = history[1]
    before, after = counters(bad["before"]), counters(bad["after"])
    if after["skipped"] > before["skipped"]:
        assert _is_zero(bad["updates"]) and _same_state(bad["after"].inner_state, bad["before"].inner_state)
    else:
        assert total(after, "rejected") > total(before, "rejected"), (before, after)
        assert_finite_like(bad["updates"], bad["params"])
        assert not _is_zero(bad["updates"])
    final = counters(state)
    assert final["skipped"] == after["skipped"] and total(final, "rejected") == total(after, "rejected")
    assert float(problem.loss(params)) < float(problem.loss(problem.params))


# --------------------------------------------------------------------------- singular and indefinite curvature


@pytest.mark.parametrize("name", ["kfac", "ekfac", "natural_gradient", "unit_wise_ng", "kbfgs", "smw_ng"])
def test_zero_inputs_make_a_singular_input_factor(name):
    """All-zero inputs: the input factor ``A`` (and unit-wise blocks) is singular up to the
    bias coordinate. Damping and the solvers' fallbacks keep every step finite and applied."""
    case = RECIPES[name]
    problem = tiny_problem("mlp", dtype="float64")
    zero_batch = (torch.zeros_like(problem.batch[0]), problem.batch[1])
    problem = Problem(problem.model, problem.params, zero_batch)
    params, state, history = _run(case, problem, 4, settings=case.every_step)
    for record in history:
        assert_finite_like(record["updates"], record["params"])
    assert int(state.skipped) == 0
    assert float(problem.loss(params)) < float(problem.loss(problem.params))


def test_failed_cholesky_falls_back_to_the_clamped_eigendecomposition():
    """Cholesky of an indefinite Hessian plus a small damping fails, and so do its three
    retries with 10x, 100x, 1000x the damping: the solver then uses ``(max(H, 0) + λI)⁻¹``,
    counted as 4 failures, and the step equals that dense formula."""
    problem = tiny_problem("mlp", dtype="float64")
    damping = 1e-4
    transform = fp.natural_gradient(problem.model, 1.0, kind="hessian", structure="full", solver="cholesky",
                                    damping=damping, momentum=0.0, kl_clip=None, ema_decay=0.0)
    state = transform.init(problem.params)
    _, grads = fp.loss_and_grads(problem.model, problem.params, problem.batch)
    updates, state = transform.update(grads, state, problem.params, batch=problem.batch)
    assert int(state.inner_state["precondition"].failures) == 4 and int(state.skipped) == 0
    hessian = dense_hessian(problem.model, problem.params, problem.batch)
    values, vectors = torch.linalg.eigh(hessian)
    assert values.min() < -10 * damping  # indefinite beyond the damping and its retries
    inverse = vectors @ torch.diag(1.0 / (values.clamp(min=0.0) + damping)) @ vectors.T
    expected = -(inverse @ fp.tree.ravel(grads)[0])
    torch.testing.assert_close(fp.tree.ravel(updates)[0], expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["layer", "kron", "unit"])
def test_indefinite_curvature_keeps_training(structure):
    """The Hessian in layer, Kronecker and unit-wise blocks, inverted by Cholesky with little
    damping: failures are counted, every step is finite and applied."""
    problem = tiny_problem("mlp", dtype="float64")
    transform = fp.natural_gradient(problem.model, 0.1, kind="hessian", structure=structure, solver="cholesky",
                                    damping=1e-4)
    params, state = problem.params, transform.init(problem.params)
    for _ in range(4):
        _, grads = fp.loss_and_grads(problem.model, params, problem.batch)
        updates, state = transform.update(grads, state, params, batch=problem.batch)
        assert_finite_like(updates, params)
        params = fp.apply_updates(params, updates)
    assert int(state.inner_state["precondition"].failures) > 0 and int(state.skipped) == 0
    assert bool(tree_all_finite(params))


def test_newton_clamps_negative_curvature():
    """Newton on an indefinite Hessian (scaled-up weights saturate tanh): negative eigenvalues
    are clamped, so the step is ``(max(H, 0) + λI)⁻¹ g``, a descent direction."""
    problem = tiny_problem("mlp", dtype="float64")
    params = tree_map(lambda p: 3.0 * p, problem.params)
    hessian = dense_hessian(problem.model, params, problem.batch)
    values, vectors = torch.linalg.eigh(hessian)
    assert values.min() < 0
    transform = fp.newton(problem.model, 1.0, damping=0.5)
    _, grads = fp.loss_and_grads(problem.model, params, problem.batch)
    updates, state = transform.update(grads, transform.init(params), params, batch=problem.batch)
    gradient = fp.tree.ravel(grads)[0]
    expected = -(vectors @ torch.diag(1.0 / (values.clamp(min=0.0) + 0.5)) @ vectors.T @ gradient)
    torch.testing.assert_close(fp.tree.ravel(updates)[0], expected, rtol=1e-8, atol=1e-10)
    assert float(gradient @ fp.tree.ravel(updates)[0]) < 0 and int(state.skipped) == 0


def test_one_member_s_failed_cholesky_does_not_change_the_others():
    """An ensemble of three where only member 1's Hessian blocks are indefinite beyond the
    damping: its Cholesky fails and falls back; under vmap every member gets what a loop
    gives it, and the others count no failure."""
    problem = tiny_problem("mlp", dtype="float64")
    transform = fp.natural_gradient(problem.model, 0.1, kind="hessian", structure="layer", solver="cholesky",
                                    damping=0.1, momentum=0.0)
    members = [tree_map(lambda p, s=scale: p * s, problem.params) for scale in (0.5, 1.0, 0.3)]
    batched, _ = assert_ensemble_matches_loop(problem.model, transform, members, problem.batch, steps=2)
    failures = batched[1].inner_state["precondition"].failures.tolist()
    assert failures[1] > 0 and failures[0] == 0 and failures[2] == 0, failures
    assert batched[1].skipped.tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- bfloat16 parameters


@pytest.mark.parametrize("name", ["kfac", "shampoo", "psgd", "kbfgs"])
def test_bfloat16_parameters_with_float32_factors(name):
    """``with_precision``: bfloat16 parameters, the recipe in float32. Each update is the
    float32 recipe's update on the widened parameters, rounded to bfloat16; a NaN gradient
    is still skipped and counted."""
    case = RECIPES[name]
    problem = tiny_problem("mlp", dtype="bfloat16")
    wide = Problem(problem.model, tree_map(lambda p: p.float(), problem.params),
                   (problem.batch[0].float(), problem.batch[1]))
    narrow_transform = with_precision(case.make(problem.model, wide.batch[0]))
    wide_transform = case.make(problem.model, wide.batch[0])
    params = problem.params
    narrow_state, wide_state = narrow_transform.init(params), wide_transform.init(wide.params)
    assert all(leaf.dtype != torch.bfloat16 for leaf in tree_leaves(narrow_state))
    for step in range(3):
        _, grads = fp.loss_and_grads(problem.model, params, problem.batch)
        if step == 1:
            grads = _poison(grads, "nan")
        updates, narrow_state = narrow_transform.update(grads, narrow_state, params, batch=problem.batch, key=KEY)
        expected, wide_state = wide_transform.update(tree_map(lambda g: g.float(), grads), wide_state,
                                                     tree_map(lambda p: p.float(), params), batch=wide.batch, key=KEY)
        for key, update in updates.items():
            assert update.dtype == torch.bfloat16
            assert torch.equal(update, expected[key].to(torch.bfloat16)), key
        params = fp.apply_updates(params, updates)
    assert int(narrow_state.skipped) == 1 and bool(tree_all_finite(params))


# --------------------------------------------------------------------------- the numerical kernels


def test_conjugate_gradient_is_scale_invariant_in_float32():
    """CG on right-hand sides of 1e30 and 1e-30 (float32, where ``bᵀb`` overflows or
    underflows) returns the scaled solution of the unit problem."""
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(6, 6, generator=generator)
    matrix = root @ root.T + 0.5 * torch.eye(6)
    rhs = {"x": torch.randn(6, generator=generator)}
    wide = {"x": rhs["x"].to(torch.float32)}
    solve = fp.solvers.cg.conjugate_gradient
    unit, _ = solve(lambda v: {"x": matrix.float() @ v["x"]}, wide, iterations=12, tol=0.0)
    torch.testing.assert_close(unit["x"].double(), torch.linalg.solve(matrix, rhs["x"]), rtol=1e-4, atol=1e-5)
    for factor in (1e30, 1e-30):
        scaled, info = solve(lambda v: {"x": matrix.float() @ v["x"]}, {"x": wide["x"] * factor}, iterations=12,
                             tol=0.0)
        torch.testing.assert_close(scaled["x"] / factor, unit["x"], rtol=1e-5, atol=0.0)
        assert bool(torch.isfinite(info.residual))


def test_eigh_of_a_non_finite_matrix_gives_nan_values_not_an_error():
    """One NaN matrix in a batch: its eigenvalues are NaN (callers reject it), the others'
    decompositions are those of each matrix alone."""
    from fprecond.spectral import symmetric_eigh

    generator = torch.Generator().manual_seed(1)
    roots = torch.randn(3, 4, 4, generator=generator)
    matrices = roots @ roots.mT
    matrices[1, 2, 0] = float("nan")
    values, vectors = symmetric_eigh(matrices)
    assert bool(torch.isnan(values[1]).all())
    for index in (0, 2):
        alone_values, alone_vectors = symmetric_eigh(matrices[index])
        assert torch.equal(values[index], alone_values) and torch.equal(vectors[index], alone_vectors)
        torch.testing.assert_close(alone_values, torch.linalg.eigvalsh(matrices[index]), rtol=1e-10, atol=1e-12)


def test_eigh_that_fails_to_converge_in_float32_is_redone_in_float64(monkeypatch):
    """LAPACK's float32 solver can fail to converge on finite, rank-deficient matrices (K-FAC
    factors of a 1024-wide layer from a batch of 256 do); the decomposition is then done in
    float64 and cast back, instead of the error stopping training."""
    from fprecond import spectral

    generator = torch.Generator().manual_seed(2)
    roots = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    matrices = (roots @ roots.mT).float()  # rank 3 of 6
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(matrix):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    values, vectors = spectral.symmetric_eigh(matrices)
    assert calls == [torch.float32, torch.float64]
    assert values.dtype == vectors.dtype == torch.float32
    torch.testing.assert_close(vectors @ torch.diag_embed(values) @ vectors.mT, matrices, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(matrices.double()).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError):  # float64 failures are not hidden
        monkeypatch.setattr(torch.linalg, "eigh", lambda matrix: (_ for _ in ()).throw(
            torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")))
        spectral.symmetric_eigh(matrices.double())
