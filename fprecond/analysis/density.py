"""The spectral density of a curvature matrix by stochastic Lanczos quadrature (SLQ).

Ubaru, Chen & Saad (2017), "Fast estimation of tr(f(A)) via stochastic Lanczos
quadrature"; Ghorbani, Krishnan & Xiao (2019), "An investigation into neural net
optimization via Hessian eigenvalue density".

The spectral density of a symmetric ``C`` (``P x P``, eigenvalues ``λ_i``) is
``φ(t) = (1/P) Σ_i δ(t − λ_i)``, so that ``∫ f dφ = tr(f(C))/P``. For a unit probe
``u`` with ``E[u uᵀ] = I/P`` (a normalised Rademacher or Gaussian vector),
``E[uᵀ f(C) u] = tr(f(C))/P``, and ``m`` Lanczos steps from ``u`` give the Gauss
quadrature ``uᵀ f(C) u ≈ Σ_k τ_k f(θ_k)`` (:func:`~fprecond.analysis.lanczos.lanczos_quadrature`,
exact for polynomials of degree ``<= 2m − 1``). Averaging over ``L`` probes,

    ``φ(t) ≈ (1/L) Σ_l Σ_k τ_lk δ(t − θ_lk)``,

and the returned density replaces each ``δ`` with a Gaussian of standard
deviation ``σ`` evaluated on a grid, normalised (trapezoid rule) to integrate to
1 on the grid. The raw nodes ``θ_lk`` and weights ``τ_lk`` (each probe's weights
sum to 1) are returned too: moments ``Σ_lk τ_lk θ_lk^j / L`` estimate
``tr(C^j)/P`` without any smoothing.

Defaults follow the reference implementation of Ghorbani et al.
(``google/spectral-density``, ``density.py``): a kernel variance
``σ² = 1e-5 · max(1, λ_max − λ_min)`` of the nodes' range and 10000 grid
points; the grid here extends ``5σ`` beyond the extreme nodes (the reference
uses a fixed ``0.01``), so every kernel lies on it up to ``~3e-7`` of its mass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.func import vmap

from fprecond import random as random_keys
from fprecond._validation import check_choice, check_number
from fprecond.analysis.lanczos import check_count, lanczos_flat, ritz_pairs
from fprecond.analysis.operators import Mvp, flatten_mvp
from fprecond.curvature.hutchinson import Distribution, probe_vectors
from fprecond.tree import PyTree, ravel

__all__ = ["SpectralDensity", "spectral_density", "gaussian_smoothing"]

# Grid points x nodes evaluated at once by gaussian_smoothing (bounds its memory).
_KERNEL_BLOCK = 1 << 22


class SpectralDensity(NamedTuple):
    """What :func:`spectral_density` returns.

    Attributes:
        grid: ``(G,)`` points ``t``.
        density: ``(G,)`` the smoothed density at ``grid``; ``trapezoid(density, grid) = 1``.
        nodes: ``(L, m)`` quadrature nodes (Ritz values) of each probe, ascending.
        weights: ``(L, m)`` their weights (squared first components), each row summing to 1.
        sigma: 0-dim, the kernel's standard deviation.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: torch.Tensor


def gaussian_smoothing(nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor,
                       sigma: torch.Tensor | float) -> torch.Tensor:
    """``Σ_k w_k N(t; θ_k, σ²)`` at every ``t`` of ``grid`` (``nodes``, ``weights`` flattened together).

    Evaluated in blocks of nodes so that at most ``2**22`` kernel values exist at once.
    """
    nodes, weights = nodes.reshape(-1), weights.reshape(-1)
    sigma = torch.as_tensor(sigma, dtype=grid.dtype, device=grid.device)
    block = max(1, _KERNEL_BLOCK // max(grid.shape[-1], 1))
    total = grid.new_zeros(grid.shape)
    for begin in range(0, nodes.shape[-1], block):
        centred = (grid[:, None] - nodes[None, begin:begin + block]) / sigma
        total = total + torch.exp(-0.5 * centred * centred) @ weights[begin:begin + block]
    return total / (math.sqrt(2.0 * math.pi) * sigma)


def spectral_density(mvp: Mvp, like: PyTree, *, key: torch.Tensor, probes: int = 10, iterations: int = 100,
                     grid: torch.Tensor | None = None, grid_points: int = 10000, sigma: float | None = None,
                     distribution: Distribution = "rademacher", reorthogonalize: bool = True,
                     chunk_size: int | None = None) -> SpectralDensity:
    """The eigenvalue density of the symmetric operator ``C`` by stochastic Lanczos quadrature.

    Probe ``l`` is ``probe_vectors(split(key, L)[l], like, distribution)`` (normalised
    inside Lanczos); the ``L`` Lanczos runs are batched with ``torch.func.vmap``
    (``chunk_size`` bounds how many run at once; each holds an ``(m, P)`` basis).
    See the module docstring for the math and the defaults.

    Args:
        mvp: ``v ↦ C v`` on pytrees shaped like ``like`` (e.g. :func:`curvature_mvp`).
        like: a tree with the shapes and the dtype of the vectors (e.g. ``params``).
        key: an :mod:`fprecond.random` key.
        probes: ``L >= 1``; default 10.
        iterations: Lanczos steps ``m`` per probe (reduced to ``P``, where the
            quadrature is exact); default 100, as PyHessian's density ``iter``.
        grid: ``(G,)`` points at which to evaluate the density (``G >= 2``); default:
            ``grid_points`` equally spaced points from ``min θ − 5σ`` to ``max θ + 5σ``.
        grid_points: ``G`` of the default grid (``>= 2``); default 10000.
        sigma: the kernel's standard deviation (``> 0``); default
            ``√(1e-5 · max(1, max θ − min θ))``.
        distribution: ``"rademacher"`` (default, Ubaru et al.) or ``"normal"``
            (Ghorbani et al.).
        reorthogonalize: full reorthogonalisation in Lanczos (default).
        chunk_size: passed to ``vmap`` over probes.

    Returns:
        A :class:`SpectralDensity` ``(grid, density, nodes, weights, sigma)``.
    """
    owner = "spectral_density"
    check_count(owner, "probes", probes)
    check_count(owner, "iterations", iterations)
    check_count(owner, "grid_points", grid_points, low=2)
    check_choice(owner, "distribution", distribution, ("rademacher", "normal"))
    if sigma is not None:
        check_number(owner, "sigma", sigma, low=0.0, low_inclusive=False)
    if chunk_size is not None:
        check_count(owner, "chunk_size", chunk_size)
    if grid is not None and (not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.shape[0] < 2):
        raise ValueError(f"{owner}: grid must be a 1-D tensor of at least 2 points")
    matvec, flat_like, _ = flatten_mvp(mvp, like)
    steps = min(iterations, flat_like.shape[-1])
    keys = random_keys.split(key, probes)

    def quadrature(probe_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = ravel(probe_vectors(probe_key, like, distribution))[0]
        alphas, betas, _ = lanczos_flat(matvec, start, steps, reorthogonalize)
        theta, vectors = ritz_pairs(alphas, betas)
        return theta, vectors[0] ** 2

    nodes, weights = vmap(quadrature, chunk_size=chunk_size)(keys)
    low, high = nodes.min(), nodes.max()
    if sigma is None:
        width = torch.sqrt(1e-5 * torch.clamp(high - low, min=1.0))
    else:
        width = torch.as_tensor(sigma, dtype=nodes.dtype, device=nodes.device)
    if grid is None:
        pad = 5.0 * width
        fractions = torch.linspace(0.0, 1.0, grid_points, dtype=nodes.dtype, device=nodes.device)
        grid = (low - pad) + (high - low + 2.0 * pad) * fractions
    else:
        grid = grid.to(dtype=nodes.dtype, device=nodes.device)
    density = gaussian_smoothing(nodes, weights / probes, grid, width)
    # Normalise on the grid, as the reference does (guarded for a grid away from all mass).
    mass = torch.trapezoid(density, grid)
    density = density / torch.where(mass > 0, mass, torch.ones_like(mass))
    return SpectralDensity(grid, density, nodes, weights, width)
