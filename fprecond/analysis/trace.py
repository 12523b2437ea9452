"""Hutchinson's stochastic trace estimator, matrix-free, with an explicit key.

Hutchinson (1990); Avron & Toledo (2011), "Randomized algorithms for estimating
the trace of an implicit symmetric positive semi-definite matrix". For probes
``z`` with independent entries of mean 0 and variance 1, ``E[zᵀ C z] = tr(C)``.
The estimate averages ``S`` draws ``zᵀ C z``; its standard error is the sample
standard deviation over ``√S``. The variance of one draw is
``2 Σ_{i≠j} C_ij²`` for Rademacher probes (the smallest among such probes; zero
for a diagonal ``C``, where every draw is exact) and ``2 ||C||_F²`` for Gaussian
probes. This is the trace estimate of PyHessian (Yao et al. 2020).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.func import vmap

from fprecond import random as random_keys
from fprecond._validation import check_choice
from fprecond.analysis.lanczos import check_count
from fprecond.analysis.operators import Mvp, flatten_mvp
from fprecond.curvature.hutchinson import Distribution, probe_vectors
from fprecond.tree import PyTree, tree_vdot

__all__ = ["TraceEstimate", "hutchinson_trace"]


class TraceEstimate(NamedTuple):
    """What :func:`hutchinson_trace` returns.

    Attributes:
        estimate: 0-dim, the mean of the draws (an unbiased estimate of ``tr(C)``).
        standard_error: 0-dim, ``std(draws, correction=1) / √S``.
        draws: ``(S,)`` the individual ``zᵀ C z``.
    """

    estimate: torch.Tensor
    standard_error: torch.Tensor
    draws: torch.Tensor


def hutchinson_trace(mvp: Mvp, like: PyTree, *, key: torch.Tensor, samples: int = 100,
                     distribution: Distribution = "rademacher", chunk_size: int | None = None) -> TraceEstimate:
    """``tr(C) ≈ (1/S) Σ_s z_sᵀ C z_s`` with ``S = samples`` probes drawn from ``key``.

    Probe ``s`` is ``probe_vectors(split(key, S)[s], like, distribution)`` (see
    :func:`fprecond.curvature.hutchinson.probe_vectors`). The ``S`` products are
    batched with ``torch.func.vmap`` over the probes (``mvp`` must be a
    ``torch.func``-compatible pure function, as :func:`curvature_mvp` is);
    ``chunk_size`` bounds how many run at once.

    Args:
        mvp: ``v ↦ C v`` on pytrees shaped like ``like`` (or flat tensors with a flat ``like``).
        like: a tree with the shapes and the dtype of the vectors (e.g. ``params``).
        key: an :mod:`fprecond.random` key.
        samples: ``S >= 2`` (two at least, for a standard error); default 100, as
            PyHessian's ``maxIter``.
        distribution: ``"rademacher"`` (default) or ``"normal"``.
        chunk_size: passed to ``vmap`` (``None``: all probes at once).

    Returns:
        A :class:`TraceEstimate` ``(estimate, standard_error, draws)``.
    """
    owner = "hutchinson_trace"
    check_count(owner, "samples", samples, low=2)
    check_choice(owner, "distribution", distribution, ("rademacher", "normal"))
    if chunk_size is not None:
        check_count(owner, "chunk_size", chunk_size)
    flatten_mvp(mvp, like)  # validates like
    keys = random_keys.split(key, samples)

    def draw(probe_key: torch.Tensor) -> torch.Tensor:
        probe = probe_vectors(probe_key, like, distribution)
        return tree_vdot(probe, mvp(probe))

    draws = vmap(draw, chunk_size=chunk_size)(keys)
    return TraceEstimate(draws.mean(), draws.std(correction=1) / math.sqrt(samples), draws)
