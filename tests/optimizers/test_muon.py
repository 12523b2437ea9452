"""Muon: the orthogonalised direction against the SVD, steps against a dense
re-implementation, routing (and the AdamW part against torch.optim.AdamW),
numerics, an ensemble under vmap against a loop, and training on digits against SGD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fprecond as fp
from fprecond.optimizers.muon import muon, muon_labels, scale_by_muon
from fprecond.tree import ravel, tree_map

from tests.helpers import assert_ensemble_matches_loop, assert_relative_close, make_problem, train_digits

QUINTIC = (3.4445, -4.7750, 2.0315)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def newton_schulz_by_svd(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """``U p^{∘steps}(Σ / (||M||_F + 1e-7)) Vᵀ``: the quintic polynomial acting on singular values."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    x = s / (torch.linalg.norm(matrix) + 1e-7)
    a, b, c = QUINTIC
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return u @ torch.diag(x) @ vh


def well_conditioned(rows: int, columns: int, seed: int) -> torch.Tensor:
    """A random matrix with singular values spread over [1, 3]."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, columns)
    left = torch.linalg.qr(torch.randn(rows, k, generator=g))[0]
    right = torch.linalg.qr(torch.randn(columns, k, generator=g))[0]
    return left @ torch.diag(torch.linspace(1.0, 3.0, k)) @ right.T


@pytest.mark.parametrize("shape", [(12, 7), (5, 9), (6, 6), (4, 2, 3, 3)])
def test_direction_is_close_to_the_polar_factor(shape):
    """Quintic Newton–Schulz keeps the singular vectors of ``G`` and puts its singular
    values in [0.68, 1.14] (not at 1): five steps of ``x ↦ 3.4445x - 4.7750x³ + 2.0315x⁵``
    map every ``x`` in [0.05, 1] (here ``σ / ||G||_F``) into [0.6818, 1.1344]."""
    rows, columns = shape[0], math.prod(shape[1:])
    gradient = well_conditioned(rows, columns, seed=sum(shape)).reshape(shape)
    transform = scale_by_muon(scale="none")
    direction, _ = transform.update({"w": gradient}, transform.init({"w": gradient}))
    matrix, result = gradient.reshape(rows, -1), direction["w"].reshape(rows, -1)
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    core = u.T @ result @ vh.T  # diagonal when the singular vectors are kept
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.abs().max() < 1e-10
    values = torch.diagonal(core)
    assert (values > 0.68).all() and (values < 1.14).all(), values
    assert torch.linalg.matrix_norm(result - polar_factor(matrix), 2) < 0.32  # max |σ' - 1| over the band


def dense_muon_steps(params, gradients, *, lr, momentum, nesterov, wd, scale):
    """Muon on each >=2-D leaf, in float64, with the orthogonalisation through the SVD."""
    params = {name: p.clone() for name, p in params.items() if p.ndim >= 2}
    buffers = {name: torch.zeros_like(p) for name, p in params.items()}
    history = []
    for grads in gradients:
        for name, p in params.items():
            g = grads[name]
            buffers[name] = momentum * buffers[name] + (1 - momentum) * g
            blended = (1 - momentum) * g + momentum * buffers[name] if nesterov else buffers[name]
            matrix = blended.reshape(p.shape[0], -1)
            rows, columns = matrix.shape
            factor = {"jordan": max(1.0, rows / columns) ** 0.5, "moonlight": 0.2 * max(rows, columns) ** 0.5,
                      "none": 1.0}[scale]
            direction = factor * newton_schulz_by_svd(matrix).reshape(p.shape)
            params[name] = p - lr * (direction + wd * p)
        history.append({name: p.clone() for name, p in params.items()})
    return history


def random_gradients(params, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [tree_map(lambda p: torch.randn(p.shape, generator=g), params) for _ in range(steps)]


@pytest.mark.parametrize("scale", ["jordan", "moonlight", "none"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_steps_equal_the_dense_reimplementation(scale, nesterov):
    """Three steps on a tall matrix, a wide matrix and a conv kernel (viewed as (O, C·kh·kw)),
    with decoupled weight decay; the vector goes to AdamW."""
    g = torch.Generator().manual_seed(1)
    params = {"tall": torch.randn(9, 4, generator=g), "wide": torch.randn(3, 8, generator=g),
              "kernel": torch.randn(4, 2, 3, 3, generator=g), "bias": torch.randn(4, generator=g)}
    gradients = random_gradients(params, 3)
    settings = dict(lr=0.02, momentum=0.9, nesterov=nesterov, wd=0.1, scale=scale)
    transform = muon(None, settings["lr"], settings["momentum"], nesterov, weight_decay=settings["wd"], scale=scale)
    state = transform.init(params)
    assert set(state.inner_state["muon"]["muon"].momentum) == {"tall", "wide", "kernel"}
    expected = dense_muon_steps(params, gradients, **settings)
    current = params
    for grads, reference in zip(gradients, expected):
        updates, state = transform.update(grads, state, current)
        current = fp.apply_updates(current, updates)
        for name, value in reference.items():
            assert_relative_close(current[name], value, 1e-10)


def test_conv_kernel_is_orthogonalised_as_a_matrix():
    g = torch.Generator().manual_seed(2)
    kernel = torch.randn(5, 2, 3, 3, generator=g)
    transform = scale_by_muon(scale="jordan")
    four_d, _ = transform.update({"k": kernel}, transform.init({"k": kernel}))
    flat = kernel.reshape(5, 18)
    two_d, _ = transform.update({"k": flat}, transform.init({"k": flat}))
    assert torch.allclose(four_d["k"].reshape(5, 18), two_d["k"], rtol=0, atol=1e-14)
    # (5, 18) is wide: the Jordan scale is 1 and the rows are nearly orthonormal.
    gram = two_d["k"] @ two_d["k"].T
    assert torch.allclose(torch.diagonal(gram), torch.ones(5), atol=0.6)


class Tagger(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear, with a positional embedding and a
    free mixing matrix as raw parameters: every routing rule has a member."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.pos_embed = nn.Parameter(torch.randn(5, 6))
        self.mix = nn.Parameter(torch.randn(6, 6))
        self.hidden = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = (self.embed(tokens) + self.pos_embed) @ self.mix
        return self.head(self.norm(torch.tanh(self.hidden(x))))


def test_routing_follows_the_reference_advice():
    md = fp.model(Tagger().double(), fp.losses.cross_entropy())
    assert muon_labels(md) == {
        "embed.weight": "adamw", "pos_embed": "adamw", "mix": "muon", "hidden.weight": "muon",
        "hidden.bias": "adamw", "norm.weight": "adamw", "norm.bias": "adamw", "head.weight": "adamw",
        "head.bias": "adamw"}
    cnn, _, _ = make_problem("cnn", ("cross_entropy", "mean"))  # Conv2d -> Linear head
    assert muon_labels(cnn) == {"0.weight": "muon", "0.bias": "adamw", "3.weight": "adamw", "3.bias": "adamw"}
    transform = muon(md)
    state = transform.init(md.params())
    assert set(state.inner_state["muon"]["muon"].momentum) == {"mix", "hidden.weight"}
    assert set(state.inner_state["adamw"][0].mu) == set(md.param_names) - {"mix", "hidden.weight"}
    # Without a model, every matrix goes to Muon; labels override both rules.
    params = md.params()
    matrices = {n for n, p in params.items() if p.ndim >= 2}
    assert set(muon().init(params).inner_state["muon"]["muon"].momentum) == matrices
    only_mix = {name: "muon" if name == "mix" else "adamw" for name in params}
    assert set(muon(md, labels=only_mix).init(params).inner_state["muon"]["muon"].momentum) == {"mix"}


def test_adamw_part_equals_torch_adamw():
    md = fp.model(Tagger().double(), fp.losses.cross_entropy())
    params = md.params()
    gradients = random_gradients(params, 4, seed=3)
    lr, betas, eps, wd = 1e-2, (0.85, 0.97), 1e-6, 0.05
    transform = muon(md, adamw_learning_rate=lr, adamw_betas=betas, adamw_eps=eps, adamw_weight_decay=wd,
                     weight_decay=0.1)
    labels = muon_labels(md)
    names = [name for name in params if labels[name] == "adamw"]
    reference = {name: params[name].clone().requires_grad_(True) for name in names}
    optimizer = torch.optim.AdamW(list(reference.values()), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    state, current = transform.init(params), params
    for grads in gradients:
        updates, state = transform.update(grads, state, current)
        current = fp.apply_updates(current, updates)
        for name, p in reference.items():
            p.grad = grads[name].clone()
        optimizer.step()
        for name in names:
            assert torch.allclose(current[name], reference[name].detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factor", [0.0, 1e-30, 1e30])
def test_extreme_gradients_give_finite_updates(factor):
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    transform = muon(md)
    state = transform.init(params)
    _, grads = fp.loss_and_grads(md, params, batch)
    for _ in range(2):
        updates, state = transform.update(tree_map(lambda g: factor * g, grads), state, params)
        flat = ravel(updates)[0]
        assert torch.isfinite(flat).all()
    if factor == 0.0:
        assert torch.count_nonzero(flat) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_gradients_give_the_scale_free_muon_step(dtype):
    """Orthogonalisation ignores the gradient's scale (up to ``1e-7 / ||M||_F``), also where
    ``||M||²`` overflows (float32, 1e30)."""
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"))
    _, grads = fp.loss_and_grads(md, params, batch)
    params, grads = tree_map(lambda p: p.to(dtype), params), tree_map(lambda g: g.to(dtype), grads)
    transform = scale_by_muon()
    matrices = {"0.weight": grads["0.weight"], "3.weight": grads["3.weight"]}
    plain, _ = transform.update(matrices, transform.init(matrices))
    huge, _ = transform.update(tree_map(lambda g: 1e30 * g, matrices), transform.init(matrices))
    for name in matrices:
        assert torch.isfinite(huge[name]).all()
        tolerance = 1e-5 if dtype == torch.float64 else 1e-4  # eps / ||M||_F ~ 1e-6 for the plain one
        assert_relative_close(huge[name], plain[name], tolerance)


def test_rank_deficient_gradient_stays_finite_and_keeps_its_row_space():
    gradient = torch.outer(torch.arange(1.0, 7.0), torch.tensor([1.0, -2.0, 0.5, 0.0]))  # rank 1
    transform = scale_by_muon()
    direction, _ = transform.update({"w": gradient}, transform.init({"w": gradient}))
    assert torch.isfinite(direction["w"]).all()
    assert torch.linalg.matrix_rank(direction["w"]) == 1
    expected = newton_schulz_by_svd(gradient) * max(1.0, 6 / 4) ** 0.5
    assert torch.allclose(direction["w"], expected, atol=1e-12)


def test_ensemble_under_vmap_equals_loop():
    md, _, batch = make_problem("mlp", ("cross_entropy", "mean"), n=8)
    transform = muon(md, weight_decay=0.01, adamw_learning_rate=1e-2, adamw_weight_decay=0.01)
    members = [make_problem("mlp", ("cross_entropy", "mean"), seed=s)[1] for s in range(3)]
    assert_ensemble_matches_loop(md, transform, members, batch, steps=3)


def test_trains_digits_below_sgd():
    """Muon lr 0.05 (reference 0.02) and AdamW lr 0.03 (reference 3e-4): the reference's
    rates are tuned for long runs of large transformers; here 40 steps must move a
    64-16-10 MLP whose head and biases are on AdamW. Other settings are the defaults."""
    sgd_loss = train_digits(lambda md, inputs: fp.sgd(0.1, momentum=0.9))
    loss = train_digits(lambda md, inputs: muon(md, 0.05, adamw_learning_rate=0.03))
    assert loss < sgd_loss, f"muon: {loss:.4f} vs SGD {sgd_loss:.4f}"


def test_bad_input_raises_early():
    with pytest.raises(ValueError, match="scale"):
        scale_by_muon(scale="adam")
    with pytest.raises(ValueError, match="ns_steps"):
        scale_by_muon(ns_steps=0)
    with pytest.raises(ValueError, match="momentum"):
        muon(momentum=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        muon(learning_rate=0.0)
    with pytest.raises(ValueError, match="adamw_betas"):
        muon(adamw_betas=(0.9, 1.5))
    with pytest.raises(TypeError, match="model"):
        muon(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'bias'"):
        scale_by_muon().init({"weight": torch.zeros(3, 2), "bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="'w'"):  # a label with no transform
        muon(labels={"w": "sgd"}).init({"w": torch.zeros(3, 2)})
