"""Natural gradient in any curvature kind and structure, and its unit-wise and
diagonal special cases.

The update (Amari 1998; Martens 2020 for the GGN view) is

    d_t = (C_t + λ I)⁻¹ g_t,    θ_{t+1} = θ_t - η m_t,    m_t = μ m_{t-1} + d_t,

with ``C_t`` a running average of the chosen curvature on the training batches,
refreshed every ``curvature_every`` steps and inverted every ``inverse_every``.
"""

from __future__ import annotations

import torch

from fprecond.base import GradientTransformation, ScalarOrSchedule
from fprecond.curvature.estimate import CurvatureEstimator
from fprecond.modeling import Model
from fprecond.optimizers._recipe import recipe
from fprecond.precondition import DataParallelism, precondition
from fprecond.solvers import Solver

__all__ = ["natural_gradient", "unit_wise_ng", "diag_ng"]


def natural_gradient(model: Model, learning_rate: ScalarOrSchedule = 0.1, *, kind: str = "fisher",
                     structure: str = "kron", solver: Solver | str = "cholesky", damping: ScalarOrSchedule = 1e-3,
                     ema_decay: float = 0.95, curvature_every: int = 1, inverse_every: int = 1, warmup: int = 0,
                     momentum: float = 0.9, weight_decay: float = 0.0, kl_clip: float | None = 1e-3,
                     approx: str = "expand", samples: int = 1, per: str = "example", fallback: str = "diag",
                     example_inputs: torch.Tensor | None = None,
                     distributed: DataParallelism | None = None) -> GradientTransformation:
    """Natural gradient with any curvature ``kind`` in any ``structure`` (the general recipe).

    ``d = (C + λ I)⁻¹ g`` (block by block, see :mod:`fprecond.curvature.plan`) with
    ``C`` one of ``hessian``, ``ggn``, ``fisher``, ``fisher_mc``, ``empirical_fisher``
    (Amari 1998; Martens 2020), then heavy-ball momentum and the learning rate.
    ``kl_clip`` bounds ``η² dᵀ g`` (Ba et al. 2017; ``None`` turns it off). Parameters
    outside supported layers get diagonal blocks (``fallback="diag"``).
    ``update`` needs ``batch=(inputs, targets)`` and, for ``fisher_mc``, ``key``.

    Args:
        model: from :func:`fprecond.model`.
        learning_rate: ``η``, a number or a schedule.
        kind, structure, approx, samples, per, fallback: the curvature (see
            :func:`fprecond.curvature.estimate`).
        solver: see :mod:`fprecond.solvers`.
        damping: ``λ``, a number or a schedule.
        ema_decay: running-average decay of the curvature (0 keeps the last estimate;
            the ``lowrank`` structure needs 0).
        curvature_every, inverse_every, warmup: the schedule (see :func:`fprecond.precondition`).
        momentum, weight_decay: see :func:`fprecond.optimizers._recipe.recipe`.
        example_inputs: one batch of inputs, for the ``lowrank`` structure.
        distributed: data-parallel hooks (:class:`fprecond.distributed.DataParallel`), see
            :func:`fprecond.precondition`; None for one process.
    """
    estimator = CurvatureEstimator(model, kind, structure, approx, samples, per, fallback, ema_decay, example_inputs)
    transform = precondition(estimator, solver, damping=damping, curvature_every=curvature_every,
                             inverse_every=inverse_every, warmup=warmup, kl_clip=kl_clip,
                             learning_rate=learning_rate if kl_clip is not None else None,
                             distributed=distributed)
    return recipe("natural_gradient", transform, learning_rate=learning_rate, momentum=momentum,
                  weight_decay=weight_decay)


def unit_wise_ng(model: Model, learning_rate: ScalarOrSchedule = 0.1, *, kind: str = "fisher_mc",
                 damping: ScalarOrSchedule = 1e-2, ema_decay: float = 0.95, curvature_every: int = 1,
                 inverse_every: int = 1, momentum: float = 0.9, weight_decay: float = 0.0,
                 kl_clip: float | None = 1e-3, samples: int = 1) -> GradientTransformation:
    """Unit-wise natural gradient (Ollivier 2015; ASDL's ``unit_wise``): one dense block
    per output unit over its incoming weights and bias, ``d_u = (C_u + λ I)⁻¹ g_u``,
    each ``C_u`` of size ``(S + 1) x (S + 1)``, inverted by Cholesky in one batch."""
    return natural_gradient(model, learning_rate, kind=kind, structure="unit", solver="cholesky", damping=damping,
                            ema_decay=ema_decay, curvature_every=curvature_every, inverse_every=inverse_every,
                            momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip, samples=samples)


def diag_ng(model: Model, learning_rate: ScalarOrSchedule = 0.1, *, kind: str = "fisher_mc",
            damping: ScalarOrSchedule = 1e-2, ema_decay: float = 0.95, curvature_every: int = 1,
            momentum: float = 0.9, weight_decay: float = 0.0, kl_clip: float | None = 1e-3,
            samples: int = 1) -> GradientTransformation:
    """Diagonal natural gradient: ``d_i = g_i / (C_ii + λ)`` with the diagonal of the
    (Monte-Carlo) Fisher by default (the exact diagonal, from per-example gradients,
    not a squared-gradient proxy)."""
    return natural_gradient(model, learning_rate, kind=kind, structure="diag", solver="cholesky", damping=damping,
                            ema_decay=ema_decay, curvature_every=curvature_every, inverse_every=1,
                            momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip, samples=samples)
