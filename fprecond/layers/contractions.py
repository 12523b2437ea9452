"""Curvature statistics of one layer from its taps, all by ``einsum`` (no loops).

Inputs: ``ã`` of shape ``(N, P, G, S)`` and backpropagated output gradients
``g`` of shape ``(K, N, P, G, O)`` (``K`` vectors per example: loss-Hessian
square-root columns, sampled or observed residuals), already scaled so that the
curvature is ``Σ_{k,n} γ_kn γ_knᵀ`` with example ``n``'s gradient
``γ_kn = Σ_p g[k,n,p] ⊗ ã[n,p]`` (per group, ``(O, S)`` row-major).

Without weight sharing (``P = 1``) the diagonal and unit-wise blocks are formed
from ``g`` and ``ã`` directly, never materialising ``γ``; with sharing the
cross-position terms make ``γ`` necessary.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["per_example_matrix", "diagonal", "unit_blocks", "kronecker_factors", "input_factor", "output_factor",
           "gram_with_bias", "KronApprox"]

KronApprox = Literal["expand", "reduce"]


def per_example_matrix(inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``γ`` of shape ``(K, N, G, O, S)``."""
    return torch.einsum("knpgo,npgs->kngos", grads, inputs)


def diagonal(inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``Σ_{k,n} γ_kn²`` of shape ``(G, O, S)``."""
    if inputs.shape[1] == 1:
        return torch.einsum("kngo,ngs->gos", grads[:, :, 0].square(), inputs[:, 0].square())
    return per_example_matrix(inputs, grads).square().sum(dim=(0, 1))


def unit_blocks(inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``Σ_{k,n} γ_kn[g,o] γ_kn[g,o]ᵀ`` of shape ``(G, O, S, S)``: one block per output unit."""
    if inputs.shape[1] == 1:
        x = inputs[:, 0]
        return torch.einsum("kngo,ngs,ngt->gost", grads[:, :, 0].square(), x, x)
    gamma = per_example_matrix(inputs, grads)
    return torch.einsum("kngos,kngot->gost", gamma, gamma)


def input_factor(inputs: torch.Tensor, approx: KronApprox) -> torch.Tensor:
    """``A`` of shape ``(G, S, S)`` (see :func:`kronecker_factors`)."""
    n, p = inputs.shape[0], inputs.shape[1]
    # Scale the (N·P, S) inputs rather than the (S, S) product: fewer operations.
    if approx == "expand":
        scaled = inputs * (n * p) ** -0.5
        return torch.einsum("npgs,npgt->gst", scaled, scaled)
    scaled = inputs.mean(dim=1) * n ** -0.5
    return torch.einsum("ngs,ngt->gst", scaled, scaled)


def output_factor(grads: torch.Tensor, approx: KronApprox) -> torch.Tensor:
    """``G`` of shape ``(G, O, O)`` (see :func:`kronecker_factors`)."""
    if approx == "expand":
        return torch.einsum("knpgo,knpgr->gor", grads, grads)
    summed_grads = grads.sum(dim=2)
    return torch.einsum("kngo,kngr->gor", summed_grads, summed_grads)


def gram_with_bias(columns: torch.Tensor, has_bias: bool, count: int) -> torch.Tensor:
    """``(1/count) [x; 1][x; 1]ᵀ`` summed over the last dimension of ``columns`` ``(G, S, R)``.

    The homogeneous coordinate's row and column are the row sums, so no column of
    ones is ever concatenated onto the (large) ``R``-long data.
    """
    scaled = columns * count ** -0.5
    gram = scaled @ scaled.transpose(-1, -2)
    if not has_bias:
        return gram
    sums = columns.sum(dim=-1) / count  # (G, S)
    corner = torch.ones_like(sums[:, :1])
    top = torch.cat([gram, sums.unsqueeze(-1)], dim=-1)
    bottom = torch.cat([sums, corner], dim=-1).unsqueeze(-2)
    return torch.cat([top, bottom], dim=-2)


def kronecker_factors(inputs: torch.Tensor, grads: torch.Tensor, approx: KronApprox) -> tuple[torch.Tensor, torch.Tensor]:
    """Kronecker factors ``(A, G)`` of shapes ``(G, S, S)`` and ``(G, O, O)``.

    The layer's block is approximated per group by ``kron(G, A)`` (Martens &
    Grosse 2015; Eschenhagen et al. 2023 for weight sharing):

    - ``"expand"``: positions count as examples: ``A = (1/(N·P)) Σ_{n,p} ã ãᵀ``,
      ``G = Σ_{k,n,p} g gᵀ``;
    - ``"reduce"``: inputs are averaged and output gradients summed over positions
      first: ``A = (1/N) Σ_n ā āᵀ`` with ``ā = mean_p ã``, ``G = Σ_{k,n} ḡ ḡᵀ``
      with ``ḡ = Σ_p g``.

    Both are exact for one example without weight sharing. ``A`` is an average and
    ``G`` carries the loss scaling, as in ``curvlinops``.
    """
    return input_factor(inputs, approx), output_factor(grads, approx)
