"""The preconditioning transform: its direction, its schedule (counted), lazy work
under vmap, rejection of non-finite estimates, KL clipping and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import vmap

import fprecond as fp
from fprecond import solvers
from fprecond.curvature import estimate, estimator
from fprecond.lazy import lazy_where
from fprecond.precondition import is_due
from fprecond.tree import ravel, tree_leaves, tree_map

from tests.helpers import assert_relative_close, dense_ggn, make_problem, stack_trees

DAMPING = 0.1


@dataclasses.dataclass(frozen=True)
class CountingSolver(solvers.CholeskySolver):
    """A Cholesky solver that counts its refreshes in a Python list (test instrumentation)."""

    calls: list = dataclasses.field(default_factory=list, compare=False)

    def refresh(self, curvature, damping):
        self.calls.append(1)
        return super().refresh(curvature, damping)


def run_steps(transform, md, params, batch, steps, key=None):
    state = transform.init(params)
    outputs = []
    for _ in range(steps):
        _, grads = fp.loss_and_grads(md, params, batch)
        updates, state = transform.update(grads, state, params, batch=batch, key=key)
        outputs.append(updates)
    return outputs, state


def test_direction_is_the_damped_solve():
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    transform = fp.precondition(estimator(md, kind="ggn", structure="full"), "cholesky", damping=DAMPING)
    (updates,), _ = run_steps(transform, md, params, batch, 1)
    _, grads = fp.loss_and_grads(md, params, batch)
    dense = dense_ggn(md, params, batch)
    expected = torch.linalg.solve(dense + DAMPING * torch.eye(len(dense)), ravel(grads)[0])
    assert_relative_close(ravel(updates)[0], expected, 1e-9)


@pytest.mark.parametrize("curvature_every,inverse_every,warmup", [(1, 1, 0), (2, 4, 0), (3, 3, 2), (1, 5, 3)])
def test_schedule_counts_refreshes_and_skips_off_steps(curvature_every, inverse_every, warmup):
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    solver = CountingSolver()
    transform = fp.precondition(estimator(md, kind="empirical_fisher", structure="kron"), solver,
                                damping=DAMPING, curvature_every=curvature_every, inverse_every=inverse_every,
                                warmup=warmup)
    steps = 11
    state = transform.init(params)
    solver.calls.clear()  # init builds the cache's structure once
    estimates = []
    for _ in range(steps):
        before = int(state.estimator.count)
        _, grads = fp.loss_and_grads(md, params, batch)
        _, state = transform.update(grads, state, params, batch=batch)
        estimates.append(int(state.estimator.count) - before)
    due = [t % inverse_every == 0 or t < warmup for t in range(steps)]
    assert len(solver.calls) == sum(due) == int(state.refreshes)
    assert estimates == [int(t % curvature_every == 0 or t < warmup) for t in range(steps)]
    assert int(state.count) == steps


def test_off_steps_reuse_the_cached_preconditioner():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    transform = fp.precondition(estimator(md, kind="empirical_fisher", structure="kron"), "cholesky",
                                damping=DAMPING, curvature_every=1, inverse_every=3)
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    _, first = transform.update(grads, state, params, batch=batch)
    _, second = transform.update(grads, first, params, batch=batch)
    for a, b in zip(tree_leaves(first.preconditioner), tree_leaves(second.preconditioner)):
        assert torch.equal(a, b)
    assert int(second.estimator.count) == 2  # the curvature itself did move on


def test_lazy_where_equals_where_and_skips():
    calls = []

    def compute():
        calls.append(1)
        return torch.full((3,), 2.0)

    otherwise = torch.zeros(3)
    assert torch.equal(lazy_where(torch.tensor(False), compute, otherwise), otherwise) and not calls
    mixed = vmap(lambda m: lazy_where(m, compute, otherwise))(torch.tensor([True, False]))
    assert torch.equal(mixed, torch.tensor([[2.0] * 3, [0.0] * 3])) and len(calls) == 1
    assert torch.equal(is_due(torch.tensor(6), 3, 0), torch.tensor(True))
    assert torch.equal(is_due(torch.tensor(4), 3, 5), torch.tensor(True))
    assert torch.equal(is_due(torch.tensor(4), 3, 0), torch.tensor(False))


def test_vmap_with_members_at_different_steps_equals_loop():
    """Members whose schedules disagree (one is due, one is not) under one vmap call."""
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    transform = fp.precondition(estimator(md, kind="fisher_mc", structure="kron"), "cholesky",
                                damping=DAMPING, inverse_every=2)
    key = fp.random.key(1)
    members = [make_problem("mlp", ("cross_entropy", "mean"), seed=s)[1] for s in range(3)]
    states = []
    for index, member in enumerate(members):  # member i has taken i steps
        state = transform.init(member)
        for _ in range(index):
            _, grads = fp.loss_and_grads(md, member, batch)
            _, state = transform.update(grads, state, member, batch=batch, key=key)
        states.append(state)
    grads = [fp.loss_and_grads(md, member, batch)[1] for member in members]
    looped = [transform.update(g, s, p, batch=batch, key=key) for g, s, p in zip(grads, states, members)]

    def step(g, s, p):
        return transform.update(g, s, p, batch=batch, key=key)

    batched = vmap(step)(stack_trees(grads), stack_trees(states), stack_trees(members))
    for a, b in zip(tree_leaves(batched), tree_leaves(stack_trees(looped))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_non_finite_estimate_is_rejected():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    transform = fp.precondition(estimator(md, kind="empirical_fisher", structure="kron"), "cholesky",
                                damping=DAMPING)
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    _, state = transform.update(grads, state, params, batch=batch)
    inputs, targets = batch
    poisoned = (inputs.clone().index_fill_(0, torch.tensor([1]), float("nan")), targets)
    updates, after = transform.update(grads, state, params, batch=poisoned)
    assert int(after.rejected) == 1
    for a, b in zip(tree_leaves(state.estimator.curvature), tree_leaves(after.estimator.curvature)):
        assert torch.equal(a, b)
    assert bool(fp.tree.tree_all_finite(updates))


def test_kl_clip_bounds_the_quadratic_step():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    rate, kl = 0.5, 1e-6
    clipped = fp.precondition(estimator(md, kind="ggn", structure="full"), "cholesky", damping=DAMPING,
                              kl_clip=kl, learning_rate=rate)
    plain = fp.precondition(estimator(md, kind="ggn", structure="full"), "cholesky", damping=DAMPING)
    (a,), _ = run_steps(clipped, md, params, batch, 1)
    (b,), _ = run_steps(plain, md, params, batch, 1)
    _, grads = fp.loss_and_grads(md, params, batch)
    quadratic = rate ** 2 * fp.tree.tree_vdot(b, grads)
    assert quadratic > kl  # the clip is active in this case
    expected = tree_map(lambda x: x * (kl / quadratic) ** 0.5, b)
    assert_relative_close(ravel(a)[0], ravel(expected)[0], 1e-12)


def test_damping_schedule_is_used():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    schedule = fp.schedules.linear_schedule(1.0, 0.1, 1)  # 1.0 at step 0, 0.1 from step 1
    transform = fp.precondition(estimator(md, kind="ggn", structure="full", decay=0.5), "cholesky",
                                damping=schedule)
    outputs, state = run_steps(transform, md, params, batch, 2)
    dense = dense_ggn(md, params, batch)
    _, grads = fp.loss_and_grads(md, params, batch)
    for updates, damping in zip(outputs, (1.0, 0.1)):
        expected = torch.linalg.solve(dense + damping * torch.eye(len(dense)), ravel(grads)[0])
        assert_relative_close(ravel(updates)[0], expected, 1e-9)


def test_lowrank_state_keeps_its_shapes():
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    est = estimator(md, kind="empirical_fisher", structure="lowrank", decay=0.0, example_inputs=batch[0])
    transform = fp.precondition(est, "cholesky", damping=DAMPING)
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    updates, after = transform.update(grads, state, params, batch=batch)
    assert [x.shape for x in tree_leaves(state)] == [x.shape for x in tree_leaves(after)]
    dense = estimate(md, params, batch, kind="empirical_fisher", structure="layer").to_dense()
    expected = torch.linalg.solve(dense + DAMPING * torch.eye(len(dense)), ravel(grads)[0])
    assert_relative_close(ravel(updates)[0], expected, 1e-9)


def test_bad_input_is_rejected_early():
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"))
    est = estimator(md, kind="fisher_mc", structure="kron")
    with pytest.raises(ValueError, match="damping"):
        fp.precondition(est, damping=0.0)
    with pytest.raises(ValueError, match="inverse_every"):
        fp.precondition(est, inverse_every=0)
    with pytest.raises(ValueError, match="curvature_every"):
        fp.precondition(est, curvature_every=1.5)
    with pytest.raises(ValueError, match="warmup"):
        fp.precondition(est, warmup=-1)
    with pytest.raises(ValueError, match="learning_rate"):
        fp.precondition(est, kl_clip=1e-3)
    with pytest.raises(TypeError, match="estimator"):
        fp.precondition("kron")
    with pytest.raises(ValueError, match="solver"):
        fp.precondition(est, "lu")
    transform = fp.precondition(est)
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    with pytest.raises(TypeError, match="'batch'"):
        transform.update(grads, state, params)
    with pytest.raises(TypeError, match="'key'"):
        transform.update(grads, state, params, batch=batch)
    with pytest.raises(ValueError, match="example_inputs"):
        estimator(md, kind="empirical_fisher", structure="lowrank", decay=0.0)
    with pytest.raises(ValueError, match="decay=0"):
        estimator(md, kind="empirical_fisher", structure="lowrank", example_inputs=batch[0])
    with pytest.raises(ValueError, match="lowrank"):
        estimator(md, kind="ggn", structure="lowrank", decay=0.0, example_inputs=batch[0])
