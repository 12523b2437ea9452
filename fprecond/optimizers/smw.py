"""Empirical natural gradient solved in the Gram space: SMW-NG (Ren & Goldfarb 2019)
and SENG (Yang et al. 2022)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fprecond.base import GradientTransformation, ScalarOrSchedule
from fprecond.curvature.estimate import CurvatureEstimator
from fprecond.curvature.matrix import Curvature
from fprecond.modeling import Model, unpack_batch
from fprecond.optimizers._recipe import recipe
from fprecond.precondition import precondition
from fprecond.solvers import cholesky

__all__ = ["smw_ng", "seng", "SketchedEstimator"]

Params = dict[str, torch.Tensor]


def smw_ng(model: Model, learning_rate: ScalarOrSchedule = 0.1, *, example_inputs: torch.Tensor,
           damping: ScalarOrSchedule = 0.3, curvature_every: int = 1, inverse_every: int = 1, momentum: float = 0.9,
           weight_decay: float = 0.0, kl_clip: float | None = 1e-2) -> GradientTransformation:
    """SMW-NG: layer-wise empirical natural gradient by the Sherman-Morrison-Woodbury identity.

    Per layer, with ``U`` the ``(N, P_l)`` matrix of per-example gradients of the
    batch scaled so that the empirical Fisher is ``F = Uᵀ U``,

        d = (F + λ I)⁻¹ g = (1/λ) [g - Uᵀ (λ I_N + U Uᵀ)⁻¹ U g],

    an ``N x N`` solve instead of ``P_l x P_l`` (Ren & Goldfarb 2019). ``U`` is never
    formed for layers without weight sharing: the Gram matrix is
    ``(G Gᵀ) ⊙ (Ã Ãᵀ)`` from the output gradients and inputs (see
    :mod:`fprecond.curvature.lowrank`). ``example_inputs`` is one batch of inputs
    of the training batch size (its shape fixes ``N``).
    """
    estimator = CurvatureEstimator(model, "empirical_fisher", "lowrank", fallback="diag", decay=0.0,
                                   example_inputs=example_inputs)
    transform = precondition(estimator, cholesky(), damping=damping, curvature_every=curvature_every,
                             inverse_every=inverse_every, kl_clip=kl_clip,
                             learning_rate=learning_rate if kl_clip is not None else None)
    return recipe("smw_ng", transform, learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)


@dataclasses.dataclass(frozen=True)
class SketchedEstimator(CurvatureEstimator):
    """A low-rank empirical Fisher sketched as SENG does: estimated on the first
    ``subsample`` examples of each batch (a sketch in the sample dimension; batches
    are already in random order), with each example's gradient of a weight-sharing
    layer truncated to its best rank-``truncate`` approximation."""

    subsample: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.subsample, bool) or not isinstance(self.subsample, int) or self.subsample < 1:
            raise ValueError(f"seng: subsample must be a positive int, got {self.subsample!r}")
        if isinstance(self.example_inputs, torch.Tensor):
            object.__setattr__(self, "example_inputs", self.example_inputs[:self.subsample])
        super().__post_init__()

    def estimate(self, params: Params, batch: Any, key: torch.Tensor | None = None,
                 buffers: Params | None = None) -> Curvature:
        inputs, targets = unpack_batch(batch)
        return super().estimate(params, (inputs[:self.subsample], targets[:self.subsample]), key, buffers)


def seng(model: Model, learning_rate: ScalarOrSchedule = 0.1, *, example_inputs: torch.Tensor,
         damping: ScalarOrSchedule = 0.3, subsample: int = 32, rank: int = 16, curvature_every: int = 1,
         inverse_every: int = 1, momentum: float = 0.9, weight_decay: float = 0.0,
         kl_clip: float | None = 1e-2) -> GradientTransformation:
    """SENG: sketched empirical natural gradient (Yang, Xu, Wen, Chen & Xu 2022).

    As :func:`smw_ng`, ``d = (1/λ) [g - Uᵀ (λ I + U Uᵀ)⁻¹ U g]``, with ``U`` a sketch
    of the per-example gradients: ``subsample`` examples of the batch, and for
    layers with weight sharing each example's gradient matrix
    ``Σ_p g_p ã_pᵀ`` truncated to rank ``rank`` (an SVD), so the Gram matrix costs
    ``N² rank² (O + S)`` instead of ``N² P² (O + S)``.
    """
    estimator = SketchedEstimator(model, "empirical_fisher", "lowrank", fallback="diag", decay=0.0,
                                  example_inputs=example_inputs, truncate=rank, subsample=subsample)
    transform = precondition(estimator, cholesky(), damping=damping, curvature_every=curvature_every,
                             inverse_every=inverse_every, kl_clip=kl_clip,
                             learning_rate=learning_rate if kl_clip is not None else None)
    return recipe("seng", transform, learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)
