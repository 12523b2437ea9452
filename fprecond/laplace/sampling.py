"""Parameter samples from a Laplace posterior, with an explicit key.

``θ_s = θ* + F⁻ᵀ z_s`` with ``z_s ~ N(0, I)`` drawn by :func:`fprecond.random.normal`
and ``F`` the factor of the posterior precision (:mod:`fprecond.laplace.factor`):
for Kronecker blocks ``F⁻ᵀ z = Q_G [(Z) ⊙ (s λ^G λ^Aᵀ + δ)^{-1/2}] Q_Aᵀ`` exactly in
the Kronecker eigenbasis, for dense and unit-wise blocks a triangular solve
with the Cholesky factor, for diagonal blocks an elementwise scaling. The
samples' covariance is ``P⁻¹`` exactly in expectation. Pure: the same key gives
the same samples, and ``vmap`` over keys or over an ensemble of posteriors
equals a loop.

A subset posterior (last-layer, subnetwork) draws ``z`` for the subset only; the
other parameters come back at their MAP values, bit for bit (an expanded view
of ``mean``, no copy).
"""

from __future__ import annotations

import torch
from fprecond import random as fprandom
from fprecond._validation import check_positive_int
from fprecond.laplace.factor import PosteriorFactor, factorize
from fprecond.laplace.posterior import LaplacePosterior

__all__ = ["sample_parameters", "standard_normal_like"]

Params = dict[str, torch.Tensor]


def standard_normal_like(key: torch.Tensor, params: Params, num_samples: int) -> Params:
    """``{name: (num_samples, *shape)}`` standard normal draws, one flat ``(S, P)`` draw
    from ``key`` split in ``params``' order (so the draw does not depend on the blocks)."""
    like = next(iter(params.values()))
    sizes = [value.numel() for value in params.values()]
    flat = fprandom.normal(key, (num_samples, sum(sizes)), dtype=like.dtype).to(like.device)
    out, start = {}, 0
    for (name, value), size in zip(params.items(), sizes):
        out[name] = flat[:, start:start + size].reshape(num_samples, *value.shape)
        start += size
    return out


def sample_parameters(posterior: LaplacePosterior, key: torch.Tensor, num_samples: int, *,
                      factor: PosteriorFactor | None = None) -> Params:
    """Draw ``num_samples`` parameter sets from ``N(mean, P⁻¹)``.

    Args:
        posterior: from :func:`fprecond.laplace.fit_laplace`.
        key: a key from :mod:`fprecond.random`.
        num_samples: ``S >= 1``.
        factor: :func:`fprecond.laplace.factorize` of the posterior, to reuse one
            factorisation across calls (computed when None).

    Returns:
        ``{name: (S, *shape)}`` for every parameter of ``posterior.mean``: stack of
        samples, ready for ``vmap(model.apply)``. Parameters outside the posterior's
        subset are ``mean[name]`` expanded along the sample dimension (a view).

    Example::

        samples = sample_parameters(posterior, fp.random.key(0), 32)
        logits = torch.func.vmap(lambda p: model.apply(p, x))(samples)   # (32, N, C)
    """
    check_positive_int("sample_parameters", "num_samples", num_samples)
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"sample_parameters: key must be a key tensor from fprecond.random.key, "
                        f"got {type(key).__name__}")
    factor = factorize(posterior) if factor is None else factor
    covered = set(posterior.subset)
    # The draw follows ``mean``'s order, so "all" draws exactly what it always has.
    noise = standard_normal_like(key, {name: value for name, value in posterior.mean.items() if name in covered},
                                 num_samples)
    deviations = factor.color(noise)
    return {name: value.unsqueeze(0) + deviations[name] if name in covered
            else value.unsqueeze(0).expand(num_samples, *value.shape)
            for name, value in posterior.mean.items()}

