"""Elastic weight consolidation: the penalty and its gradient against dense float64 formulas
(diagonal: the dense summed GGN's diagonal; Kronecker: the dense matrices formed from the
stored factors), vmap over an ensemble against a loop, and forgetting on permuted digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import fprecond as fp
from fprecond.continual import add_task, consolidate, ewc, ewc_gradient, ewc_penalty, task_memory
from fprecond.curvature import KroneckerBlock
from fprecond.datasets import digits
from fprecond.tree import ravel, tree_leaves

from tests.curvature.references import param_offsets
from tests.helpers import dense_ggn, make_problem, random_like, stack_trees

WEIGHT, DECAY, STRENGTH = 0.5, 0.7, 3.0


def flat(tree) -> torch.Tensor:
    return ravel(tree)[0]


def two_tasks():
    """A tiny float64 MLP, two tasks of 6 examples (two batches each) and three parameter points:
    the anchors of the tasks and the current parameters."""
    md, params, (inputs, targets) = make_problem("mlp", ("cross_entropy", "mean"), n=12)
    tasks = [[(inputs[s:s + 3], targets[s:s + 3]) for s in (start, start + 3)] for start in (0, 6)]
    first = params
    second = {n: p + 0.3 * r for (n, p), r in zip(params.items(), random_like(params, 1).values())}
    current = {n: p + 0.3 * r for (n, p), r in zip(params.items(), random_like(params, 2).values())}
    return md, tasks, first, second, current


def dense_summed_ggn(md, params, batches) -> torch.Tensor:
    """``Σ_n`` of per-example GGNs: the dense GGN of the mean loss times the example count."""
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    return len(targets) * dense_ggn(md, params, (inputs, targets))


def dense_from_factors(md, curvature) -> torch.Tensor:
    """``(P, P)`` with ``G ⊗ A`` per Linear layer placed from the layer's definition: entry
    ``(o, s)`` of ``[W | b]`` is ``W[o, s]`` for ``s < in_features`` and ``b[o]`` for the last."""
    offsets = param_offsets(md)
    size = sum(p.numel() for p in md.module.parameters())
    dense = torch.zeros(size, size)
    for layer, block in zip(md.layers, curvature.blocks):
        assert isinstance(block, KroneckerBlock)
        weight, bias = offsets[layer.weight], offsets[layer.bias]
        positions = torch.cat([weight, bias[:, None]], dim=1).reshape(-1)  # row-major [W | b]
        kron = torch.kron(block.output_factor[0], block.input_factor[0])
        dense[positions[:, None], positions[None, :]] = kron
    return dense


def reference_terms(md, tasks, first, second, structure, mode):
    """``[(anchor, dense precision)]`` of the memory after both tasks, from dense matrices."""
    def precision(params, batches):
        if structure == "diag":
            return torch.diag(torch.diagonal(dense_summed_ggn(md, params, batches)))
        curvature = fp.curvature.dataset.dataset_curvature(md, params, batches, kind="ggn", structure="kron")
        return dense_from_factors(md, curvature)

    first_precision = DECAY * WEIGHT * precision(first, tasks[0])
    second_precision = precision(second, tasks[1])
    if mode == "online":
        return [(flat(second), first_precision), (flat(second), second_precision)]
    return [(flat(first), first_precision), (flat(second), second_precision)]


@pytest.mark.parametrize("mode", ["online", "separate"])
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_penalty_and_gradient_against_dense(structure, mode):
    md, tasks, first, second, current = two_tasks()
    memory = task_memory(mode=mode, decay=DECAY)
    memory = consolidate(memory, md, first, tasks[0], kind="ggn", structure=structure, weight=WEIGHT)
    memory = consolidate(memory, md, second, tasks[1], kind="ggn", structure=structure)
    assert memory.tasks == 2
    # an online diagonal memory is one merged curvature; Kronecker terms stay per task
    assert len(memory.precisions) == (1 if (mode, structure) == ("online", "diag") else 2)
    assert len(memory.anchors) == (1 if mode == "online" else 2)

    theta = flat(current)
    terms = reference_terms(md, tasks, first, second, structure, mode)
    expected_penalty = 0.5 * STRENGTH * sum((theta - a) @ c @ (theta - a) for a, c in terms)
    expected_gradient = STRENGTH * sum(c @ (theta - a) for a, c in terms)
    torch.testing.assert_close(ewc_penalty(memory, current, STRENGTH), expected_penalty, rtol=1e-10, atol=0)
    torch.testing.assert_close(flat(ewc_gradient(memory, current, STRENGTH)), expected_gradient, rtol=1e-10,
                               atol=1e-14)
    autograd = grad(lambda p: ewc_penalty(memory, p, STRENGTH))(current)
    torch.testing.assert_close(flat(autograd), expected_gradient, rtol=1e-10, atol=1e-14)

    transform = fp.chain(ewc(memory, STRENGTH), fp.scale_by_learning_rate(0.1))
    grads = random_like(current, 5)
    updates, _ = transform.update(grads, transform.init(current), current)
    torch.testing.assert_close(flat(updates), -0.1 * (flat(grads) + expected_gradient), rtol=1e-10, atol=1e-14)
    # the memory may come as an update keyword instead
    keyword = ewc(strength=STRENGTH)
    from_keyword, _ = keyword.update(grads, keyword.init(current), current, memory=memory)
    torch.testing.assert_close(flat(from_keyword), flat(grads) + expected_gradient, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("structure", ["kron", "unit"])
def test_penalty_on_a_cnn_against_its_dense_precisions(structure):
    """Conv kernels and biases: the penalty and pull equal the dense forms of the stored
    precisions (two Kronecker terms, or one merged unit-wise curvature)."""
    md, params, (inputs, targets) = make_problem("cnn", ("cross_entropy", "mean"), n=6)
    second = {n: p + 0.2 * r for (n, p), r in zip(params.items(), random_like(params, 1).values())}
    current = {n: p + 0.2 * r for (n, p), r in zip(params.items(), random_like(params, 2).values())}
    memory = consolidate(task_memory(decay=DECAY), md, params, [(inputs[:3], targets[:3])], kind="ggn",
                         structure=structure)
    memory = consolidate(memory, md, second, [(inputs[3:], targets[3:])], kind="ggn", structure=structure)
    assert len(memory.precisions) == (2 if structure == "kron" else 1)
    difference = flat(current) - flat(second)
    dense = sum(precision.to_dense() for precision in memory.precisions)
    torch.testing.assert_close(ewc_penalty(memory, current), 0.5 * difference @ dense @ difference, rtol=1e-10,
                               atol=0)
    torch.testing.assert_close(flat(ewc_gradient(memory, current)), dense @ difference, rtol=1e-10, atol=1e-14)


def test_empty_memory_and_anchor():
    md, tasks, first, _, current = two_tasks()
    empty = task_memory()
    assert float(ewc_penalty(empty, current)) == 0.0
    assert all(bool((g == 0).all()) for g in ewc_gradient(empty, current).values())
    memory = consolidate(empty, md, first, tasks[0], structure="kron")
    assert float(ewc_penalty(memory, first)) == 0.0  # no pull at the anchor
    assert float(ewc_penalty(memory, current)) > 0.0


def test_add_task_merges_additive_curvatures_and_detaches():
    md, tasks, first, second, _ = two_tasks()
    inputs = torch.cat([x for x, _ in tasks[0]])
    targets = torch.cat([y for _, y in tasks[0]])
    c1 = fp.curvature.estimate(md, first, (inputs, targets), kind="ggn", structure="layer")
    c2 = fp.curvature.estimate(md, second, (inputs, targets), kind="ggn", structure="layer")
    tracked = {n: p.clone().requires_grad_(True) for n, p in second.items()}
    memory = add_task(add_task(task_memory(decay=0.5), first, c1), tracked, c2, weight=2.0)
    assert len(memory.precisions) == 1
    torch.testing.assert_close(memory.precisions[0].to_dense(), 0.5 * c1.to_dense() + 2.0 * c2.to_dense())
    assert not any(leaf.requires_grad for leaf in tree_leaves(memory))
    # a Kronecker curvature after a layer-wise one is a term of its own
    kron = fp.curvature.estimate(md, second, (inputs, targets), kind="ggn", structure="kron")
    assert len(add_task(memory, second, kron).precisions) == 2


def test_ensemble_under_vmap_equals_loop():
    md, tasks, first, _, _ = two_tasks()
    members = [{n: p + 0.1 * k * r for (n, p), r in zip(first.items(), random_like(first, 10 + k).values())}
               for k in range(3)]
    batch = (torch.cat([x for x, _ in tasks[1]]), torch.cat([y for _, y in tasks[1]]))
    optimizer = fp.chain(ewc(strength=STRENGTH), fp.scale_by_adam(), fp.scale_by_learning_rate(0.05))

    def remember(params):
        memory = consolidate(task_memory(), md, params, tasks[0], kind="fisher", structure="kron")
        return consolidate(memory, md, params, tasks[1], kind="fisher", structure="kron", weight=0.5)

    def train(params, memory):  # the stacked memory is a vmapped argument, passed on as a keyword
        state = optimizer.init(params)
        for _ in range(3):
            _, grads = fp.loss_and_grads(md, params, batch)
            updates, state = optimizer.update(grads, state, params, memory=memory)
            params = fp.apply_updates(params, updates)
        return params, ewc_penalty(memory, params)

    memories = [remember(p) for p in members]
    looped = stack_trees([(memory, *train(p, memory)) for p, memory in zip(members, memories)])
    stacked_memory = vmap(remember)(stack_trees(members))
    batched = (stacked_memory, *vmap(train)(stack_trees(members), stacked_memory))
    for a, b in zip(tree_leaves(batched), tree_leaves(looped), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert bool((looped[2] > 0).all())


def test_bad_arguments_raise():
    md, tasks, first, _, current = two_tasks()
    memory = consolidate(task_memory(), md, first, tasks[0], structure="diag")
    with pytest.raises(ValueError, match="mode"):
        task_memory(mode="average")
    with pytest.raises(ValueError, match="decay"):
        task_memory(decay=1.5)
    with pytest.raises(ValueError, match="strength"):
        ewc(memory, strength=-1.0)
    with pytest.raises(ValueError, match="weight"):
        consolidate(memory, md, first, tasks[0], weight=-1.0)
    with pytest.raises(TypeError, match="TaskMemory"):
        ewc_penalty({"anchor": first}, current)
    with pytest.raises(ValueError, match="0.bias"):
        ewc_penalty(memory, {n: p for n, p in current.items() if n != "0.bias"})
    grads = random_like(current)
    with pytest.raises(TypeError, match="needs a memory"):
        ewc().update(grads, (), current)
    with pytest.raises(TypeError, match="one place"):
        ewc(memory).update(grads, (), current, memory=memory)
    with pytest.raises(TypeError, match="parameters"):
        ewc(memory).update(grads, ())


# --------------------------------------------------------------------------- forgetting


def permuted_digits_accuracy(structure: str | None, strength: float) -> tuple[float, float]:
    """Test accuracies on (original, permuted) digits after 200 Adam steps on each in turn
    (64-64-10 tanh MLP, float32, fixed seeds); EWC on the second task when ``structure``."""
    (train_x, train_y), (test_x, test_y) = digits()
    generator = torch.Generator().manual_seed(0)
    permutation = torch.randperm(64, generator=generator)
    tasks = [((train_x, train_y), (test_x, test_y)),
             ((train_x[:, permutation], train_y), (test_x[:, permutation], test_y))]
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).float()
    md = fp.model(module, fp.losses.cross_entropy())
    params, memory = md.params(), task_memory()
    for index, ((inputs, targets), _) in enumerate(tasks):
        # λ in units of the Laplace posterior for a mean loss over the new task (1/N)
        pull = ewc(memory, strength / len(targets)) if structure and index > 0 else fp.identity()
        optimizer = fp.chain(pull, fp.scale_by_adam(), fp.scale_by_learning_rate(1e-2))
        state = optimizer.init(params)
        for _ in range(200):
            batch_index = torch.randint(0, len(targets), (64,), generator=generator)
            _, grads = fp.loss_and_grads(md, params, (inputs[batch_index], targets[batch_index]))
            updates, state = optimizer.update(grads, state, params)
            params = fp.apply_updates(params, updates)
        if structure:
            memory = consolidate(memory, md, params, [(inputs, targets)], kind="fisher", structure=structure)
    return tuple(float((md.apply(params, x).argmax(-1) == y).float().mean()) for _, (x, y) in tasks)  # type: ignore


def test_ewc_reduces_forgetting_on_permuted_digits():
    """Fine-tuning on permuted pixels forgets the original digits (about 0.97 -> 0.45); EWC keeps
    them (diagonal about 0.78, Kronecker about 0.94 at the same strength) and still learns the
    new task."""
    plain_first, plain_second = permuted_digits_accuracy(None, 0.0)
    diag_first, diag_second = permuted_digits_accuracy("diag", 10.0)
    kron_first, kron_second = permuted_digits_accuracy("kron", 10.0)
    assert plain_first < 0.6 and plain_second > 0.9  # forgetting is real
    assert diag_first > plain_first + 0.2
    assert kron_first > plain_first + 0.3
    assert kron_first > diag_first  # the Kronecker factors keep the correlations within a layer
    assert diag_second > 0.88 and kron_second > 0.88
