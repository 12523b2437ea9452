"""The pure training step: the manual sequence, its metrics, vmap over an ensemble, torch.compile."""

from __future__ import annotations

import collections
import math
import typing

import optree
import pytest
import torch
from torch import nn
from torch.func import vmap

import fprecond as fp
from fprecond.training import train_step
from fprecond.tree import NAMESPACE, _walk, pytree_dataclass, static_field, tree_leaves, tree_unflatten_ordered

from tests.helpers import make_problem, stack_trees


def kfac(md):
    # inverse_every=2, warmup=1: steps 0, 2 refresh and step 1 does not, within the 3 steps tested.
    return fp.kfac(md, inverse_every=2, warmup=1)


def assert_trees_equal(a, b) -> None:
    leaves_a, leaves_b = tree_leaves(a), tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert torch.equal(x, y)


def manual(md, transform, params, state, batch, key):
    loss, grads = fp.loss_and_grads(md, params, batch)
    updates, state = transform.update(grads, state, params, batch=batch, key=key)
    return fp.apply_updates(params, updates), state, loss


@pytest.mark.parametrize("make", [lambda md: fp.sgd(0.1, momentum=0.9), kfac], ids=["sgd", "kfac"])
def test_step_is_the_manual_sequence(make):
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=8)
    transform, key = make(md), fp.random.key(3)
    step = train_step(md, transform)
    ours, state = params, transform.init(params)
    theirs, their_state = params, transform.init(params)
    for _ in range(3):
        ours, state, metrics = step(ours, state, batch, key)
        theirs, their_state, loss = manual(md, transform, theirs, their_state, batch, key)
        assert torch.equal(metrics["loss"], loss)
        assert_trees_equal((ours, state), (theirs, their_state))


def test_metrics_against_direct_computation():
    """``loss`` and ``grad_norm`` by autograd on the module itself, ``skipped`` from a NaN batch."""
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"), n=6)
    transform = kfac(md)
    step = train_step(md, transform)
    new_params, state, metrics = step(params, transform.init(params), batch, fp.random.key(0))

    module = md.module
    module.zero_grad()
    reference = nn.functional.cross_entropy(module(batch[0]), batch[1])
    reference.backward()
    norm = math.sqrt(sum(float(p.grad.square().sum()) for p in module.parameters()))
    assert set(metrics) == {"loss", "grad_norm", "skipped"}
    assert all(value.dim() == 0 for value in metrics.values())
    assert metrics["loss"].item() == pytest.approx(reference.item(), rel=1e-12)
    assert metrics["grad_norm"].item() == pytest.approx(norm, rel=1e-12)
    assert metrics["skipped"].dtype == torch.int64 and metrics["skipped"].item() == 0

    bad = (batch[0] * float("nan"), batch[1])
    for expected in (1, 2):  # cumulative: the guard's count after this step
        after, state, metrics = step(new_params, state, bad, fp.random.key(0))
        assert metrics["skipped"].item() == expected
        assert_trees_equal(after, new_params)  # a skipped step leaves the parameters alone
    assert math.isnan(metrics["loss"].item())


def test_skipped_is_zero_without_a_guard():
    md, params, batch = make_problem("mlp", ("mse", "mean"))
    transform = fp.chain(fp.scale_by_adam(), fp.scale_by_learning_rate(1e-2))  # recipes are all guarded
    _, _, metrics = train_step(md, transform)(params, transform.init(params), (batch[0] * float("nan"), batch[1]),
                                              None)
    assert metrics["skipped"].item() == 0 and metrics["skipped"].dtype == torch.int64


def test_buffers_reach_the_forward_pass_and_the_transform():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    md = fp.model(module, fp.losses.cross_entropy())
    params = md.params()
    buffers = {**md.buffers(), "1.running_mean": torch.linspace(-1.0, 1.0, 5), "1.running_var": torch.full((5,), 2.0)}
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    transform = fp.kfac(md, warmup=1)
    step = train_step(md, transform, buffers=buffers)
    new_params, state, metrics = step(params, transform.init(params), batch, fp.random.key(1))

    assert metrics["loss"].item() == pytest.approx(md.batch_loss(params, batch, buffers).item(), rel=1e-14)
    assert metrics["loss"].item() != pytest.approx(md.batch_loss(params, batch).item(), rel=1e-3)
    grads = torch.func.grad(md.batch_loss)(params, batch, buffers)
    updates, expected_state = transform.update(grads, transform.init(params), params, batch=batch,
                                               key=fp.random.key(1), buffers=buffers)
    assert_trees_equal((new_params, state), (fp.apply_updates(params, updates), expected_state))


@pytest.mark.parametrize("shared_batch", [True, False])
def test_vmap_over_members_equals_a_loop(shared_batch):
    md, _, batch = make_problem("mlp", ("cross_entropy", "mean"), n=16)
    members = [make_problem("mlp", ("cross_entropy", "mean"), seed=s)[1] for s in range(3)]
    keys = torch.stack([fp.random.key(10 + s) for s in range(3)])
    batches = [make_problem("mlp", ("cross_entropy", "mean"), n=16, seed=20 + s)[2] for s in range(3)]
    transform = kfac(md)
    step = train_step(md, transform)

    def batch_of(k):
        return batch if shared_batch else batches[k]

    looped = []
    for k, params in enumerate(members):
        state = transform.init(params)
        for _ in range(3):
            params, state, metrics = step(params, state, batch_of(k), keys[k])
        looped.append((params, state, metrics))

    params = stack_trees(members)
    state = vmap(transform.init)(params)
    stacked_batch = batch if shared_batch else stack_trees(batches)
    mapped = vmap(step, in_dims=(0, 0, None if shared_batch else 0, 0))
    for _ in range(3):
        params, state, metrics = mapped(params, state, stacked_batch, keys)
    assert metrics["loss"].shape == (3,)
    for a, b in zip(tree_leaves((params, state, metrics)), tree_leaves(stack_trees(looped))):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def compare_compiled(transform, md, params, batch, key, compiled_step, exact: bool) -> None:
    """Three steps of ``compiled_step`` against the eager step, from the same start."""
    step = train_step(md, transform)
    eager, ours = (params, transform.init(params)), (params, transform.init(params))
    for _ in range(3):
        *eager, eager_metrics = step(*eager, batch, key)
        *ours, metrics = compiled_step(*ours, batch, key)
        for a, b in zip(tree_leaves((ours, metrics)), tree_leaves((eager, eager_metrics))):
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


FIRST_ORDER = {
    "sgd": lambda md: fp.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda md: fp.adam(1e-2, weight_decay=1e-3),
}


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_compiled_first_order_step_equals_eager(name):
    """The full compiler (inductor): generated kernels may round differently, hence a tolerance."""
    torch._dynamo.reset()
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=8)
    transform = FIRST_ORDER[name](md)
    compiled = torch.compile(train_step(md, transform), fullgraph=True)
    compare_compiled(transform, md, params, batch, None, compiled, exact=False)


# The curvature recipes that trace into one graph. Those built on the layer taps (kfac, ekfac,
# natural_gradient, unit_wise_ng, diag_ng, smw_ng, seng, kbfgs) do not: see fprecond.training.
COMPILE_CLEAN = {
    "sophia": lambda md: fp.sophia(md, update_interval=2),
    "adahessian": lambda md: fp.adahessian(md),
    "psgd": lambda md: fp.psgd(md, update_interval=2),
    "muon": lambda md: fp.muon(md),
    "shampoo": lambda md: fp.shampoo(1e-2, precondition_frequency=2, start_preconditioning_step=1),
    "soap": lambda md: fp.soap(precondition_frequency=2),
    "newton": lambda md: fp.newton(md, structure="layer"),
    # 3 CG iterations instead of 20: the loop is unrolled when traced, and its length does not
    # change what is traced, only how long tracing takes. newton_cg wraps fp.hessian_free.
    "newton_cg": lambda md: fp.newton_cg(md, iterations=3),
}


@pytest.mark.parametrize("name", list(COMPILE_CLEAN))
def test_curvature_recipe_compiles_into_one_graph(name):
    """``fullgraph=True`` fails on any graph break, which is what compile-clean means; the
    ``eager`` backend runs the captured graph as is (inductor's code generation would add
    15 s to minutes per recipe on CPU), so the result must equal the eager step exactly.
    Schedules run both branches under compile (``fprecond.lazy``); the 3 steps cover a
    refresh and an off-step of each recipe's schedule."""
    torch._dynamo.reset()
    md, params, batch = make_problem("mlp", ("cross_entropy", "mean"), n=8)
    transform = COMPILE_CLEAN[name](md)
    compiled = torch.compile(train_step(md, transform), fullgraph=True, backend="eager")
    compare_compiled(transform, md, params, batch, fp.random.key(4), compiled, exact=True)


class Pair(typing.NamedTuple):
    first: typing.Any
    second: typing.Any


@pytree_dataclass
class Node:
    values: typing.Any
    count: torch.Tensor
    label: str = static_field(default="node")


def test_compile_path_flattening_matches_optree():
    """Under torch.compile the insertion-ordered flattening walks the tree in Python
    (fprecond.tree._walk); it must give optree's leaves, paths and rebuilt trees."""
    tree = {"z": Pair({"b": torch.ones(1), "a": torch.zeros(2)}, None),
            "a": [Node(collections.OrderedDict(y=torch.ones(3), x=torch.ones(4)), torch.tensor(2), label="n"),
                  (torch.arange(2),), collections.deque([torch.ones(5)], maxlen=3)],
            "d": collections.defaultdict(list, {"k": torch.ones(6)}), "e": fp.EmptyState(), "n": None}
    with optree.dict_insertion_ordered(True, namespace=NAMESPACE):
        paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    walked_paths, walked_leaves = [], []
    spec = _walk(tree, (), walked_paths, walked_leaves)
    assert walked_paths == paths
    assert all(a is b for a, b in zip(walked_leaves, leaves)) and len(walked_leaves) == len(leaves) == 8
    doubled = tree_unflatten_ordered(spec, [2 * leaf for leaf in walked_leaves])
    assert optree.tree_structure(doubled, namespace=NAMESPACE) == optree.tree_structure(tree, namespace=NAMESPACE)
    assert list(doubled) == list(tree) and list(doubled["z"].first) == ["b", "a"]
    assert doubled["a"][0].label == "n" and doubled["d"].default_factory is list and doubled["a"][2].maxlen == 3
    assert all(torch.equal(a, 2 * b) for a, b in zip(tree_leaves(doubled), leaves))
    with pytest.raises(ValueError, match="leaves"):
        tree_unflatten_ordered(spec, walked_leaves[:-1])


def test_bad_arguments():
    md, _, _ = make_problem("mlp", ("cross_entropy", "mean"))
    with pytest.raises(TypeError, match="model"):
        train_step(md.module, fp.sgd(0.1))
    with pytest.raises(TypeError, match="transform"):
        train_step(md, fp.sgd)
    with pytest.raises(TypeError, match="buffers"):
        train_step(md, fp.sgd(0.1), buffers=[torch.zeros(1)])
