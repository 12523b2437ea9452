"""K-FAC (Martens & Grosse 2015): Kronecker-factored natural gradient."""

from __future__ import annotations

from fprecond.base import GradientTransformation, ScalarOrSchedule
from fprecond.modeling import Model
from fprecond.optimizers.natural_gradient import natural_gradient
from fprecond.precondition import DataParallelism
from fprecond.solvers import cholesky

__all__ = ["kfac"]


def kfac(model: Model, learning_rate: ScalarOrSchedule = 0.1, *, kind: str = "fisher_mc",
         damping: ScalarOrSchedule = 1e-3, pi_damping: bool = True, approx: str = "expand", ema_decay: float = 0.95,
         curvature_every: int = 1, inverse_every: int = 10, warmup: int = 5, momentum: float = 0.9,
         weight_decay: float = 0.0, kl_clip: float | None = 1e-3, samples: int = 1,
         fallback: str = "diag", distributed: DataParallelism | None = None) -> GradientTransformation:
    """K-FAC: per layer, ``ΔW = (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹``.

    ``A = E[ã ãᵀ]`` over layer inputs (with the homogeneous coordinate for the bias)
    and ``G = E[g gᵀ]`` over backpropagated output gradients are running averages
    (``ema_decay``) of the Fisher's Kronecker factors: ``fisher_mc`` by default (one
    target sampled from the model's predictive per example, Martens & Grosse 2015
    §5), ``fisher`` (exact expectation over the predictive) or ``empirical_fisher``.
    π-damping (§6.3) splits ``λ`` between the factors with
    ``π² = (tr A / dim A) / (tr G / dim G)``; ``pi_damping=False`` uses ``√λ`` for
    each. Layers with weight sharing (convolutions, sequences) use the ``expand``
    or ``reduce`` approximation (Eschenhagen et al. 2023). Norm layers get exact
    unit-wise 2x2 blocks, other parameters diagonal blocks.

    The factors are updated every ``curvature_every`` steps and inverted by Cholesky
    every ``inverse_every`` (every step for the first ``warmup``); the update is
    then clipped so that ``η² dᵀ g <= kl_clip`` (Ba et al. 2017), passed through
    momentum ``μ`` and scaled by ``-η``. ``update`` needs ``batch`` and, for
    ``fisher_mc``, ``key`` (folded with the step count).

    Data-parallel training: pass ``distributed=fprecond.distributed.DataParallel(comm)`` and
    put :func:`fprecond.distributed.all_reduce_gradients` before this recipe in a chain; the
    factors are then averaged over processes and the inverses shared among them (see
    :mod:`fprecond.distributed.sharding`).
    """
    return natural_gradient(model, learning_rate, kind=kind, structure="kron", solver=cholesky(pi=pi_damping),
                            damping=damping, ema_decay=ema_decay, curvature_every=curvature_every,
                            inverse_every=inverse_every, warmup=warmup, momentum=momentum,
                            weight_decay=weight_decay, kl_clip=kl_clip, approx=approx, samples=samples,
                            fallback=fallback, distributed=distributed)
