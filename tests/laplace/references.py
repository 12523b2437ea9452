"""Dense float64 references for the Laplace tests: the summed-loss curvature by plain
autograd, the prior as a diagonal, the posterior precision and the marginal likelihood
written out with ``torch.logdet`` and ``torch.linalg.inv``."""

from __future__ import annotations

import math

import torch

import fprecond as fp
from fprecond.tree import ravel

from tests.curvature.references import block_mask, layer_groups, unit_groups
from tests.helpers import dense_ggn, dense_hessian, make_problem

SPLIT = (7, 5, 8)  # uneven batches of the 20 examples


def problem(loss: str = "cross_entropy", n: int = 20, seed: int = 0):
    """The tiny 4-5-3 tanh MLP (float64) with a mean-reduced loss, and its batches."""
    md, params, (inputs, targets) = make_problem("mlp", (loss, "mean"), n=n, seed=seed)
    batches, start = [], 0
    sizes = SPLIT if n == sum(SPLIT) else (n,)
    for size in sizes:
        batches.append((inputs[start:start + size], targets[start:start + size]))
        start += size
    return md, params, (inputs, targets), batches


def summed(md: fp.Model) -> fp.Model:
    loss = fp.losses.cross_entropy("sum") if isinstance(md.loss, fp.losses.CrossEntropyLoss) else fp.losses.mse("sum")
    return fp.model(md.module, loss)


def dense_curvature(md: fp.Model, params, batch, kind: str, structure: str) -> torch.Tensor:
    """The summed-loss curvature with the block pattern of ``structure`` (``kron``: the layer
    blocks, exact for one example)."""
    dense = (dense_hessian if kind == "hessian" else dense_ggn)(summed(md), params, batch)
    if structure == "full":
        return dense
    if structure == "diag":
        return torch.diag_embed(torch.diagonal(dense))
    groups = unit_groups(md) if structure == "unit" else layer_groups(md)
    return dense * block_mask(dense.shape[0], groups)


def prior_diagonal(params, per_layer: dict[str, float] | float) -> torch.Tensor:
    """The prior precision of every flat parameter entry; ``per_layer`` maps the module
    prefix ('0', '2') to its value."""
    parts = []
    for name, value in params.items():
        delta = per_layer if isinstance(per_layer, float) else per_layer[name.split(".")[0]]
        parts.append(torch.full((value.numel(),), delta))
    return torch.cat(parts)


def dense_log_marginal(log_likelihood: torch.Tensor, precision: torch.Tensor, prior: torch.Tensor,
                       params) -> torch.Tensor:
    """``log p(D|θ) - ½ (log det P - log det P₀ + θᵀ P₀ θ)``."""
    theta = ravel(params)[0]
    return log_likelihood - 0.5 * (torch.logdet(precision) - prior.log().sum() + (prior * theta.square()).sum())


def gaussian_normaliser(targets: torch.Tensor, sigma: float) -> float:
    return targets.numel() * math.log(sigma * math.sqrt(2 * math.pi))
