"""The preconditioning transform: a curvature estimator and a solver with one state.

``precondition(estimator, solver, ...)`` is a :class:`~fprecond.base.GradientTransformation`
that turns the gradient ``g`` into ``P g`` with ``P = solver(C + λ I)``, the
cached preconditioner of the running curvature ``C``. Its schedule:

- step ``t`` (0-based) takes a fresh curvature estimate on ``batch`` when
  ``t % curvature_every == 0`` and refreshes ``P`` when ``t % inverse_every == 0``;
  during the first ``warmup`` steps both happen every step;
- on other steps the cost is the product ``P g`` alone.

The step count lives in the state as a tensor, so ``update`` stays a pure
function of its arguments. Scheduled work is skipped through
:func:`fprecond.lazy.lazy_where`: the result equals a ``torch.where`` between
recomputing and keeping, and the recomputation runs only when some ensemble
member is due, so under ``torch.func.vmap`` an ensemble gives what a loop gives
and still skips off-steps.

Numerical safety: an estimate with NaN/Inf entries (a bad batch) is rejected and
the running curvature kept (``state.rejected`` counts them); solvers never
return NaN/Inf for finite curvature (``state.failures`` counts failed
factorisations that needed more damping or an eigendecomposition).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, TypeVar

import torch

from fprecond import random as random_keys
from fprecond._validation import check_number, check_positive_int, step_counter
from fprecond.base import GradientTransformation, Params, ScalarOrSchedule, Updates, require_params
from fprecond.curvature.eigenbasis import EigenbasisEstimator, EigenbasisState
from fprecond.curvature.estimate import CurvatureEstimator, EstimatorState
from fprecond.curvature.matrix import Curvature
from fprecond.lazy import lazy_where
from fprecond.schedules import evaluate
from fprecond.solvers import Refreshed, Solver, solver_from
from fprecond.tree import pytree_dataclass, tree_all_finite, tree_map, tree_scale, tree_vdot

__all__ = ["precondition", "PreconditionState", "is_due", "DataParallelism"]

T = TypeVar("T")


class DataParallelism(Protocol):
    """How a preconditioner shares its work among data-parallel processes: the hooks
    :func:`precondition` (and :func:`fprecond.shampoo`) call when given ``distributed=``.
    :class:`fprecond.distributed.DataParallel` implements them with ``torch.distributed``.

    Every method is called at the same point of the program on every process (the
    schedule is a function of the step count, which all processes share).
    """

    @property
    def mode(self) -> str:
        """``"inverse"``, ``"gradient"`` or ``"replicate"`` (see :mod:`fprecond.distributed.sharding`)."""
        ...

    def reduce(self, curvature: Curvature) -> Curvature:
        """A fresh local curvature estimate -> the estimate on all processes' batches."""
        ...

    def sampling_key(self, key: torch.Tensor) -> torch.Tensor:
        """The step's shared key -> this process's key for Monte-Carlo draws."""
        ...

    def keep(self, solver: Solver, preconditioner: Curvature) -> Curvature:
        """The part of a preconditioner computed by every process (at ``init``) that this one keeps."""
        ...

    def refresh(self, solver: Solver, curvature: Curvature, damping: torch.Tensor | float,
                previous: Curvature) -> Refreshed:
        """``solver.refresh(curvature, damping)`` with the work shared; ``previous`` is the last result."""
        ...

    def apply(self, solver: Solver, preconditioner: Curvature, vector: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """``solver.apply(preconditioner, vector)`` on a preconditioner from :meth:`refresh`."""
        ...

    def share(self, compute: Callable[[int], T], templates: Sequence[T], prices: Sequence[Any] | None = None
              ) -> list[T]:
        """``[compute(i) for i in range(len(templates))]``, each computed by one process and
        sent to the others (``templates[i]`` is shaped like ``compute(i)``). Items are given
        to processes by the cost of ``prices[i]`` (default ``templates[i]``): pytrees whose
        tensors' shapes stand for the work (they may be on the ``meta`` device)."""
        ...

    def owned(self, prices: Sequence[Any]) -> list[bool]:
        """Whether this process computes item ``i`` of a :meth:`share` with these ``prices``
        (all True in one process or ``"replicate"`` mode)."""
        ...


@pytree_dataclass
class PreconditionState:
    """State of :func:`precondition` (tensor leaves only).

    Attributes:
        count: steps taken (0-dim int64).
        estimator: the running curvature (:class:`~fprecond.curvature.EstimatorState`).
        preconditioner: the solver's cached output for the last refresh.
        refreshes: number of preconditioner refreshes so far (the expensive solves).
        failures: failed factorisation attempts so far (see :mod:`fprecond.solvers`).
        rejected: curvature estimates rejected for NaN/Inf entries.
    """

    count: torch.Tensor
    estimator: EstimatorState | EigenbasisState
    preconditioner: Curvature
    refreshes: torch.Tensor
    failures: torch.Tensor
    rejected: torch.Tensor


def is_due(count: torch.Tensor, every: int, warmup: int = 0) -> torch.Tensor:
    """0-dim bool: whether step ``count`` is on a schedule of period ``every`` (steps
    ``0, every, 2·every, ...``, and every step before ``warmup``)."""
    return (count % every == 0) | (count < warmup)


def precondition(estimator: CurvatureEstimator | EigenbasisEstimator, solver: Solver | str = "cholesky", *,
                 damping: ScalarOrSchedule = 1e-3, curvature_every: int = 1, inverse_every: int = 1,
                 warmup: int = 0, kl_clip: float | None = None,
                 learning_rate: ScalarOrSchedule | None = None,
                 distributed: DataParallelism | None = None) -> GradientTransformation:
    """Precondition gradients with ``solver(C + λ I)`` of ``estimator``'s running curvature.

    Args:
        estimator: a :class:`~fprecond.curvature.CurvatureEstimator` (kind, structure,
            running-average ``decay``), or an
            :class:`~fprecond.curvature.eigenbasis.EigenbasisEstimator` (EKFAC).
        solver: a :class:`~fprecond.solvers.Solver` or a name (``"cholesky"``, ``"eigh"``,
            ``"inverse_root"``, ``"newton_schulz"``, ``"cg"``).
        damping: ``λ > 0``, a number or a schedule of the step count.
        curvature_every: take a curvature estimate every this many steps.
        inverse_every: refresh the preconditioner every this many steps.
        warmup: steps at the start on which both happen every step.
        kl_clip: if set, scale the update by ``min(1, sqrt(kl_clip / (lr² |gᵀ P g|)))``
            (Ba et al. 2017), which bounds the step's KL divergence under the
            curvature's quadratic model; needs ``learning_rate``.
        learning_rate: the learning rate applied later in the chain (for ``kl_clip``).
        distributed: ``None`` (one process), or data-parallel hooks
            (:class:`fprecond.distributed.DataParallel`): each fresh estimate is averaged over
            the processes before the NaN check and the running average, Monte-Carlo draws use
            ``distributed.sampling_key``, and refreshes (and in ``"gradient"`` mode the product
            ``P g``) are shared among the processes. Needs a
            :class:`~fprecond.curvature.CurvatureEstimator` (not ``lowrank``) or an
            :class:`~fprecond.curvature.eigenbasis.EigenbasisEstimator` (its factors and
            moments are averaged, its eigendecompositions shared; not in ``"gradient"`` mode),
            and gradients already averaged over the processes; cannot run under ``vmap``.

    ``update(grads, state, params, batch=(inputs, targets), key=..., buffers=...)``:
    ``batch`` is required; ``key`` is required by ``fisher_mc`` estimators and is
    folded with the step count, so one key per run suffices. Updates are scaled
    like the loss's gradient (the curvature follows the loss's reduction).
    """
    owner = "precondition"
    if not all(hasattr(estimator, name) for name in ("init", "update", "kind")):
        raise TypeError(f"{owner}: estimator must be a CurvatureEstimator (or offer init, update and kind), "
                        f"got {type(estimator).__name__}")
    solver = solver_from(solver)
    check_number(owner, "damping", damping, low=0.0, low_inclusive=False, allow_schedule=True)
    check_positive_int("precondition", "curvature_every", curvature_every)
    check_positive_int("precondition", "inverse_every", inverse_every)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"{owner}: warmup must be a non-negative int, got {warmup!r}")
    if kl_clip is not None:
        check_number(owner, "kl_clip", kl_clip, low=0.0, low_inclusive=False)
        if learning_rate is None:
            raise ValueError(f"{owner}: kl_clip needs the learning_rate the chain applies")
        check_number(owner, "learning_rate", learning_rate, low=0.0, low_inclusive=False, allow_schedule=True)
    needs_key = estimator.kind == "fisher_mc"
    if distributed is not None:
        if not isinstance(estimator, (CurvatureEstimator, EigenbasisEstimator)):
            raise TypeError(f"{owner}: distributed= needs a CurvatureEstimator or an EigenbasisEstimator (their fresh "
                            f"estimates are averaged over processes), got {type(estimator).__name__}")
        if isinstance(estimator, EigenbasisEstimator) and getattr(distributed, "mode", None) == "gradient":
            raise ValueError(f"{owner}: distributed mode 'gradient' is not offered for EKFAC: every process needs "
                             "every layer's eigenbasis to compute its moments, so keeping each layer on one process "
                             "would save no memory; use mode 'inverse' (the eigendecompositions are shared)")
        if estimator.structure == "lowrank":
            raise ValueError(f"{owner}: distributed= cannot average 'lowrank' estimates (their vectors would have to "
                             "be gathered, not averaged); use another structure")
        shares = ("share",) if isinstance(estimator, EigenbasisEstimator) else ()
        for method in ("reduce", "sampling_key", "keep", "refresh", "apply") + shares:
            if not callable(getattr(distributed, method, None)):
                raise TypeError(f"{owner}: distributed must offer {method}() (fprecond.distributed.DataParallel), "
                                f"got {type(distributed).__name__}")

    def damping_at(count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return evaluate(damping, count).to(like.dtype)

    def init(params: Params) -> PreconditionState:
        count = step_counter(owner, params)
        estimator_state = estimator.init(params)
        like = next(iter(params.values()))
        refreshed = solver.refresh(estimator_state.curvature, damping_at(count, like))
        zero = torch.zeros_like(count)
        preconditioner = refreshed.preconditioner
        if distributed is not None:
            preconditioner = distributed.keep(solver, preconditioner)
        return PreconditionState(count, estimator_state, preconditioner, zero, zero, zero)

    def update(updates: Updates, state: PreconditionState, params: Params | None = None, **extra: Any):
        params = require_params(owner, params)
        batch, key = extra.get("batch"), extra.get("key")
        if batch is None:
            raise TypeError(f"{owner}.update() needs the keyword argument 'batch' (the (inputs, targets) the "
                            "curvature is estimated on): update(grads, state, params, batch=...)")
        if needs_key and key is None:
            raise TypeError(f"{owner}.update() needs the keyword argument 'key' for kind 'fisher_mc' "
                            "(fprecond.random.key(seed); it is folded with the step count)")
        count = state.count
        like = next(iter(params.values()))

        def estimate() -> tuple[Any, torch.Tensor]:
            step_key = random_keys.fold_in(key, count) if key is not None and needs_key else None
            buffers = extra.get("buffers")
            if distributed is None:
                fresh = estimator.update(state.estimator, params, batch, step_key, buffers)  # type: ignore[arg-type]
            else:  # averaged before the NaN check, so that every process takes the same decision
                local_key = None if step_key is None else distributed.sampling_key(step_key)
                if isinstance(estimator, EigenbasisEstimator):  # its eigendecompositions are shared too
                    fresh = estimator.update(state.estimator, params, batch, local_key,  # type: ignore[arg-type]
                                             buffers, reduce=distributed.reduce, share=distributed.share)
                else:
                    fresh = estimator.update(state.estimator, params, batch, local_key,  # type: ignore[arg-type]
                                             buffers, reduce=distributed.reduce)
            bad = ~tree_all_finite(fresh)  # the whole new state: EKFAC keeps its running factors outside .curvature
            return lazy_where(bad, lambda: state.estimator, fresh), bad.to(count.dtype)

        curvature_due = is_due(count, curvature_every, warmup)
        estimator_state, rejected = lazy_where(curvature_due, estimate, (state.estimator, torch.zeros_like(count)))

        def refresh() -> tuple[Curvature, torch.Tensor, torch.Tensor]:
            if distributed is None:
                refreshed = solver.refresh(estimator_state.curvature, damping_at(count, like))
            else:
                refreshed = distributed.refresh(solver, estimator_state.curvature, damping_at(count, like),
                                                state.preconditioner)
            return refreshed.preconditioner, refreshed.failures.to(count.dtype), torch.ones_like(count)

        inverse_due = is_due(count, inverse_every, warmup)
        zero = torch.zeros_like(count)
        preconditioner, failures, refreshed = lazy_where(inverse_due, refresh, (state.preconditioner, zero, zero))

        if distributed is None:
            directions = solver.apply(preconditioner, updates)
        else:
            directions = distributed.apply(solver, preconditioner, updates)
        if kl_clip is not None:
            assert learning_rate is not None
            rate = evaluate(learning_rate, count)
            # In float64: for a float32 gradient of 1e30, dᵀg overflows float32 (inf, or NaN from
            # inf - inf), which would skip the step (or zero it).
            wide = [tree_map(lambda x: x.to(torch.float64), tree) for tree in (directions, updates)]
            quadratic = tree_vdot(*wide).abs() * rate.to(torch.float64).square()
            factor = torch.clamp(torch.sqrt(kl_clip / quadratic.clamp(min=torch.finfo(torch.float64).tiny)), max=1.0)
            directions = tree_scale(directions, factor.to(like.dtype))

        new_state = PreconditionState(count + 1, estimator_state, preconditioner, state.refreshes + refreshed,
                                      state.failures + failures, state.rejected + rejected)
        return directions, new_state

    return GradientTransformation(init, update)
