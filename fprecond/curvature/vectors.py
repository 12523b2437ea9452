"""Backpropagated vectors of the Gauss-Newton family of curvature kinds.

Each kind is ``C = Σ_{k,n} γ_kn γ_knᵀ`` with ``γ_kn = J_nᵀ c_kn``: the Jacobian of
example ``n``'s outputs applied to an output-space vector. :func:`cotangents`
builds the ``c_k`` (``K`` of them, each shaped like the outputs), with the
scaling folded in so no kind needs a separate factor:

- ``ggn``, ``fisher``: the columns of the square root ``S`` of the loss Hessian
  w.r.t. the outputs, one per output entry of a loss term (``C`` for ``(N, C)``
  outputs, ``T·C`` for ``(N, T, C)``, so sequence terms never mix). ``S Sᵀ`` is
  the loss Hessian, so for the losses in :mod:`fprecond.losses` the GGN and the
  exact (type-2) Fisher are the same matrix.
- ``fisher_mc``: ``√(R/M) ∂L(f, ŷ_m)/∂f`` for ``M`` targets ``ŷ_m`` drawn from the
  model's predictive with an explicit key.
- ``empirical_fisher``: ``√R ∂L(f, y)/∂f`` with the observed targets, one vector
  per example (``per="example"``, default, ASDL) or one per loss term masked to
  its position (``per="term"``, curvlinops).

``R`` is the loss's reduction factor (``L = (1/R) Σ ℓ``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.func import vjp, vmap

from fprecond.losses import Loss
from fprecond.modeling import Model
from fprecond.tree import tree_map

__all__ = ["cotangents", "example_gradient_vectors"]


def _per_term(vectors: torch.Tensor) -> torch.Tensor:
    """``(N, T, C, K)`` per-term vectors -> ``(T·K, N, T, C)``, each vector nonzero at one position."""
    n, t, c, k = vectors.shape
    eye = torch.eye(t, dtype=vectors.dtype, device=vectors.device)
    return torch.einsum("ntck,tu->tknuc", vectors, eye).reshape(t * k, n, t, c)


def cotangents(kind: str, loss: Loss, targets: torch.Tensor, *, key: torch.Tensor | None = None,
               samples: int = 1, per: str = "example") -> Callable[[torch.Tensor], torch.Tensor]:
    """``outputs -> (K, *outputs.shape)`` for a Gauss-Newton-family ``kind`` (see module docstring)."""

    def build(outputs: torch.Tensor) -> torch.Tensor:
        # Every kind checks the batch's targets, also those that do not read them (the
        # GGN, sampled Fisher): a batch that does not fit the loss is a bug upstream.
        loss.check(outputs, targets)
        factor = loss.reduction_factor(outputs)
        if kind in ("ggn", "fisher"):
            root = loss.hessian_sqrt(outputs)  # (N, [T,] C, C)
            if outputs.dim() == 2:
                return root.permute(2, 0, 1)
            return _per_term(root)
        if kind == "empirical_fisher":
            residual = math.sqrt(factor) * loss.output_gradient(outputs, targets)
            if per == "term" and outputs.dim() == 3:
                return _per_term(residual.unsqueeze(-1))
            return residual.unsqueeze(0)
        assert key is not None, "fisher_mc needs a key"
        sampled = loss.sample_targets(outputs, key, samples=samples)  # (M, *targets.shape)
        residuals = loss.output_gradient(outputs, sampled)
        return math.sqrt(factor / samples) * residuals

    return build


def example_gradient_vectors(model: Model, params: dict[str, torch.Tensor], inputs: Any, vectors: torch.Tensor,
                             names: tuple[str, ...], buffers: dict[str, torch.Tensor] | None = None
                             ) -> dict[str, torch.Tensor]:
    """``γ_kn = J_nᵀ c_kn`` restricted to the parameters ``names``: ``{name: (K, N, *shape)}``.

    For parameters outside supported layers (no taps): one VJP per example, vmapped
    over examples and over the ``K`` vectors.
    """
    subset = {name: params[name] for name in names}

    def one_example(x: Any, example_vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        single = tree_map(lambda t: t.unsqueeze(0), x)
        pullback = vjp(lambda p: model.apply({**params, **p}, single, buffers), subset)[1]
        return vmap(lambda v: pullback(v.unsqueeze(0))[0])(example_vectors)

    return vmap(one_example, in_dims=(0, 1), out_dims=1)(inputs, vectors)
