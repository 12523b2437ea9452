"""Shared tiny models, batches and dense brute-force references for the tests."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from typing import Callable

import pytest
import torch
from torch import nn
from torch.func import vmap

import fprecond as fp
from fprecond.datasets import digits
from fprecond.tree import ravel, tree_leaves, tree_map

# --------------------------------------------------------------------------- models


class SequenceMLP(nn.Module):
    """A Linear layer applied to every position of a sequence: (N, T, D) -> (N, T, C)."""

    def __init__(self, d_in: int = 3, hidden: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inner = nn.Linear(d_in, hidden)
        self.outer = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.inner(x)))


class EmbeddingLayerNorm(nn.Module):
    """Embedding -> LayerNorm -> Linear on token sequences: (N, T) ints -> (N, T, C)."""

    def __init__(self, vocab: int = 7, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.embed(tokens))))


@dataclasses.dataclass(frozen=True)
class Case:
    """A tiny model with a batch maker: ``inputs(n, generator)`` and its output shape per example."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]
    output_shape: tuple[int, ...]  # per example, last entry = C


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


CASES = {
    "mlp": Case("mlp", _mlp, lambda n, g: torch.randn(n, 4, generator=g), (3,)),
    "cnn": Case("cnn", _cnn, lambda n, g: torch.randn(n, 2, 4, 4, generator=g), (3,)),
    "sequence": Case("sequence", SequenceMLP, lambda n, g: torch.randn(n, 5, 3, generator=g), (5, 3)),
    "embedding": Case("embedding", EmbeddingLayerNorm, lambda n, g: torch.randint(0, 7, (n, 5), generator=g), (5, 3)),
}

LOSSES = {
    ("cross_entropy", "mean"): lambda: fp.losses.cross_entropy("mean"),
    ("cross_entropy", "sum"): lambda: fp.losses.cross_entropy("sum"),
    ("mse", "mean"): lambda: fp.losses.mse("mean"),
    ("mse", "sum"): lambda: fp.losses.mse("sum"),
}


def make_targets(loss: fp.losses.Loss, n: int, output_shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if isinstance(loss, fp.losses.CrossEntropyLoss):
        return torch.randint(0, output_shape[-1], (n, *output_shape[:-1]), generator=g)
    return torch.randn(n, *output_shape, generator=g)


def make_problem(case_name: str, loss_key: tuple[str, str], n: int = 4, seed: int = 0):
    """``(model description, params, batch)`` for a case and a loss, in float64."""
    case = CASES[case_name]
    torch.manual_seed(seed)
    module = case.build().double()
    loss = LOSSES[loss_key]()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = case.inputs(n, g)
    targets = make_targets(loss, n, case.output_shape, g)
    description = fp.model(module, loss)
    return description, description.params(), (inputs, targets)


# --------------------------------------------------------------------------- dense references


def flat_function(params: dict[str, torch.Tensor], fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]):
    """``θ_flat -> fn(unravel(θ_flat))`` and the flat starting point."""
    flat, unravel = ravel(params)
    return (lambda theta: fn(unravel(theta))), flat


def reference_term_losses(loss: fp.losses.Loss, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Unreduced loss terms with torch.nn.functional, independent of fprecond.losses."""
    if isinstance(loss, fp.losses.CrossEntropyLoss):
        flat = torch.nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1),
                                                 reduction="none")
        return flat.reshape(outputs.shape[:-1])
    return torch.nn.functional.mse_loss(outputs, targets, reduction="none").sum(-1)


def reference_reduction_factor(loss: fp.losses.Loss, outputs: torch.Tensor) -> int:
    if loss.reduction == "sum":
        return 1
    if isinstance(loss, fp.losses.CrossEntropyLoss):
        return math.prod(outputs.shape[:-1])
    return outputs.numel()


def reference_loss(loss: fp.losses.Loss, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return reference_term_losses(loss, outputs, targets).sum() / reference_reduction_factor(loss, outputs)


def dense_hessian(md: fp.Model, params, batch) -> torch.Tensor:
    inputs, targets = batch
    fn, flat = flat_function(params, lambda p: reference_loss(md.loss, md.apply(p, inputs), targets))
    return torch.autograd.functional.hessian(fn, flat)


def dense_jacobian(md: fp.Model, params, inputs) -> torch.Tensor:
    """(N·T·C, P) Jacobian of the flattened outputs."""
    fn, flat = flat_function(params, lambda p: md.apply(p, inputs).reshape(-1))
    return torch.autograd.functional.jacobian(fn, flat)


def dense_output_hessian(loss: fp.losses.Loss, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N·T·C, N·T·C) Hessian of the reduced loss w.r.t. the flattened outputs."""
    shape = outputs.shape
    return torch.autograd.functional.hessian(lambda f: reference_loss(loss, f.reshape(shape), targets),
                                             outputs.detach().reshape(-1))


def dense_ggn(md: fp.Model, params, batch) -> torch.Tensor:
    inputs, targets = batch
    jac = dense_jacobian(md, params, inputs)
    outputs = md.apply(params, inputs)
    return jac.T @ dense_output_hessian(md.loss, outputs, targets) @ jac


def dense_empirical_fisher(md: fp.Model, params, batch, per: str = "example") -> torch.Tensor:
    """``R Σ_g ∇L_g ∇L_gᵀ`` by a Python loop over examples (or terms), autograd only."""
    inputs, targets = batch
    outputs = md.apply(params, inputs)
    factor = reference_reduction_factor(md.loss, outputs)
    flat, unravel = ravel(params)
    n = targets.shape[0]
    groups = [(i,) for i in range(n)]
    if per == "term" and outputs.dim() == 3:
        groups = [(i, t) for i in range(n) for t in range(outputs.shape[1])]
    total = torch.zeros(flat.numel(), flat.numel())
    for index in groups:
        theta = flat.clone().requires_grad_(True)
        out = md.apply(unravel(theta), inputs)
        terms = reference_term_losses(md.loss, out, targets)
        share = terms[index].sum() / factor
        (gradient,) = torch.autograd.grad(share, theta)
        total += factor * torch.outer(gradient, gradient)
    return total


def stack_trees(trees):
    """Stack same-structured trees leaf-wise along a new leading (ensemble) dimension."""
    return tree_map(lambda *xs: torch.stack(xs), *trees)


def random_like(params, seed: int = 3):
    """A standard-normal tree shaped like ``params``, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return tree_map(lambda p: torch.randn(p.shape, generator=g), params)


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """``||actual - expected|| <= tol · ||expected||`` (with a floor for an all-zero reference)."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = torch.linalg.vector_norm(actual - expected).item()
    scale = max(torch.linalg.vector_norm(expected).item(), 1e-30)
    assert error <= tol * scale, f"relative error {error / scale:.3e} > {tol:.1e}"


def require_peer(name: str):
    """Import a test-only peer library; CI (FPRECOND_REQUIRE_PEERS=1) fails instead of skipping."""
    if os.environ.get("FPRECOND_REQUIRE_PEERS") == "1":
        return importlib.import_module(name)  # the submodule itself for dotted names
    return pytest.importorskip(name)


# --------------------------------------------------------------------------- training


def train_digits(make, steps: int = 40, batch_size: int = 64) -> float:
    """The full training loss of a 64-16-10 tanh MLP after ``steps`` steps on digits (float32).

    ``make(model, example_inputs) -> transform``; every step passes ``batch`` and the
    fixed ``key=fp.random.key(7)`` (recipes fold it with their step count). The
    shared baseline is ``fp.sgd(0.1, momentum=0.9)``, which reaches about 0.46.
    """
    torch.manual_seed(0)
    (train_x, train_y), _ = digits()
    module = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).float()
    md = fp.model(module, fp.losses.cross_entropy())
    params = md.params()
    transform = make(md, train_x[:batch_size])
    state = transform.init(params)
    generator = torch.Generator().manual_seed(1)
    key = fp.random.key(7)
    for _ in range(steps):
        index = torch.randint(0, len(train_y), (batch_size,), generator=generator)
        batch = (train_x[index], train_y[index])
        _, grads = fp.loss_and_grads(md, params, batch)
        updates, state = transform.update(grads, state, params, batch=batch, key=key)
        params = fp.apply_updates(params, updates)
    return float(md.batch_loss(params, (train_x, train_y)))


# --------------------------------------------------------------------------- ensembles


def _assert_leaves_close(batched, looped, rtol: float, atol: float) -> None:
    for a, b in zip(tree_leaves(batched), tree_leaves(looped), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def train_steps(md: fp.Model, transform, params, batch, key=None, steps: int = 3):
    """``(params, state)`` after ``steps`` steps of ``transform`` on one batch, from its ``init``."""
    state = transform.init(params)
    for _ in range(steps):
        _, grads = fp.loss_and_grads(md, params, batch)
        updates, state = transform.update(grads, state, params, batch=batch, key=key)
        params = fp.apply_updates(params, updates)
    return params, state


def assert_ensemble_matches_loop(md: fp.Model, transform, members, batch, *, key=None, keys=None, steps: int = 3,
                                 rtol: float = 1e-8, atol: float = 1e-10):
    """Train ``members`` (a list of parameter dicts) under ``vmap`` and in a Python loop, with
    one shared ``key`` or one key per member (``keys``, stacked); assert every leaf of the
    final ``(params, state)`` agrees and return ``(batched, looped)`` for further checks."""
    if keys is None:
        looped = stack_trees([train_steps(md, transform, p, batch, key, steps) for p in members])
        batched = vmap(lambda p: train_steps(md, transform, p, batch, key, steps))(stack_trees(members))
    else:
        looped = stack_trees([train_steps(md, transform, p, batch, k, steps) for p, k in zip(members, keys)])
        batched = vmap(lambda p, k: train_steps(md, transform, p, batch, k, steps))(stack_trees(members), keys)
    _assert_leaves_close(batched, looped, rtol, atol)
    return batched, looped


def assert_gradient_ensemble_matches_loop(transform, members, member_grads, *, rtol: float = 1e-8,
                                          atol: float = 1e-10):
    """As :func:`assert_ensemble_matches_loop` for a transform fed given gradients:
    ``member_grads[i]`` is member ``i``'s list of gradient trees, one per step."""

    def train(params, grads):
        state = transform.init(params)
        for g in grads:
            updates, state = transform.update(g, state, params)
            params = fp.apply_updates(params, updates)
        return params, state

    steps = len(member_grads[0])
    looped = stack_trees([train(p, g) for p, g in zip(members, member_grads)])
    per_step = [stack_trees([grads[s] for grads in member_grads]) for s in range(steps)]
    batched = vmap(train)(stack_trees(members), per_step)
    _assert_leaves_close(batched, looped, rtol, atol)
    return batched, looped
