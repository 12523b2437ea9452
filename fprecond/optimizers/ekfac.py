"""EKFAC (George et al. 2018): K-FAC's eigenbasis with re-estimated eigenvalues."""

from __future__ import annotations

from fprecond._validation import check_positive_int
from fprecond.base import GradientTransformation, ScalarOrSchedule
from fprecond.curvature.eigenbasis import EigenbasisEstimator
from fprecond.modeling import Model
from fprecond.optimizers._recipe import recipe
from fprecond.precondition import DataParallelism, precondition
from fprecond.solvers import cholesky

__all__ = ["ekfac"]


def ekfac(model: Model, learning_rate: ScalarOrSchedule = 0.1, *, kind: str = "fisher_mc",
          damping: ScalarOrSchedule = 1e-2, approx: str = "expand", ema_decay: float = 0.95, scale_every: int = 1,
          basis_every: int = 10, momentum: float = 0.9, weight_decay: float = 0.0, kl_clip: float | None = 1e-3,
          samples: int = 1, fallback: str = "diag", distributed: DataParallelism | None = None
          ) -> GradientTransformation:
    """EKFAC: per layer, ``ΔW = Q_G [(Q_Gᵀ ∇W Q_A) / (s + λ)] Q_Aᵀ``.

    ``Q_A``, ``Q_G`` are eigenvectors of K-FAC's running factors ``A`` and ``G``,
    refreshed every ``basis_every`` estimates; ``s`` is the running average of the
    per-example gradients' squared coordinates in that basis (see
    :mod:`fprecond.curvature.eigenbasis`), re-estimated every ``scale_every`` steps
    (George et al. 2018, Algorithm 1 with ``n = scale_every``, ``T_kfe =
    basis_every · scale_every``). Damping is exact (``s + λ``), not factored.
    Then KL clipping, momentum and the learning rate as :func:`fprecond.kfac`.

    Data-parallel training: pass ``distributed=fprecond.distributed.DataParallel(comm)`` and
    put :func:`fprecond.distributed.all_reduce_gradients` before this recipe in a chain. The
    fresh factors and moments are averaged over processes, each layer's eigendecomposition
    is computed by one process and its eigenbases sent to the others, and the damped
    eigenvalues ``1 / (s + λ)`` (elementwise) are computed everywhere (``mode="inverse"``
    or ``"replicate"``; ``"gradient"`` is refused, see :func:`fprecond.precondition`).
    """
    check_positive_int("ekfac", "scale_every", scale_every)  # named here: precondition calls it curvature_every
    estimator = EigenbasisEstimator(model, kind, approx, samples, fallback, ema_decay, basis_every)
    transform = precondition(estimator, cholesky(kron="exact"), damping=damping, curvature_every=scale_every,
                             inverse_every=scale_every, kl_clip=kl_clip,
                             learning_rate=learning_rate if kl_clip is not None else None, distributed=distributed)
    return recipe("ekfac", transform, learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)
