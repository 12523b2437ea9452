"""Newton's method on the exact Hessian (full or layer-wise) and Hessian-free
Newton-CG (Martens 2010)."""

from __future__ import annotations

from typing import Any

import torch

from fprecond import func
from fprecond._validation import check_number, step_counter
from fprecond.base import (GradientTransformation, Params, ScalarOrSchedule, Updates, named_chain, require_params,
                           validated)
from fprecond.curvature.estimate import CurvatureEstimator, estimate
from fprecond.modeling import Model
from fprecond.optimizers._recipe import guarded, recipe
from fprecond.precondition import precondition
from fprecond.schedules import evaluate
from fprecond.solvers import eigh
from fprecond.solvers.cg import conjugate_gradient
from fprecond.transforms import scale_by_learning_rate
from fprecond.tree import pytree_dataclass, tree_add_scaled, tree_map, tree_scale, tree_vdot, tree_zeros_like

__all__ = ["newton", "newton_cg", "hessian_free", "HessianFreeState"]


def newton(model: Model, learning_rate: ScalarOrSchedule = 1.0, *, structure: str = "full",
           damping: ScalarOrSchedule = 1.0, eigenvalues: str = "clamp", curvature_every: int = 1,
           momentum: float = 0.0, weight_decay: float = 0.0, kl_clip: float | None = None) -> GradientTransformation:
    """Damped Newton: ``d = (f(H) + λ I)⁻¹ g`` with the exact Hessian ``H`` of the batch loss.

    ``structure`` is ``"full"`` or ``"layer"`` (one block per layer, as in block-
    diagonal Newton). ``H`` is indefinite away from a minimum: ``f`` clamps negative
    eigenvalues at zero (``eigenvalues="clamp"``, the step then relies on ``λ``
    in those directions) or takes their absolute values (``"abs"``: saddle-free
    Newton, Dauphin et al. 2014). The Hessian costs one Hessian-vector product per
    parameter of each block and an eigendecomposition per block: for small models.
    With ``learning_rate=1`` and small ``λ`` a quadratic loss is minimised in one step.
    """
    if structure not in ("full", "layer"):
        raise ValueError(f"newton: structure must be 'full' or 'layer', got {structure!r}")
    estimator = CurvatureEstimator(model, "hessian", structure, fallback="diag", decay=0.0)
    transform = precondition(estimator, eigh(eigenvalues=eigenvalues), damping=damping,
                             curvature_every=curvature_every, inverse_every=curvature_every, kl_clip=kl_clip,
                             learning_rate=learning_rate if kl_clip is not None else None)
    return recipe("newton", transform, learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)


@pytree_dataclass
class HessianFreeState:
    """State of :func:`hessian_free`.

    Attributes:
        count: steps taken.
        damping: the current Levenberg-Marquardt damping ``λ`` (0-dim).
        previous: the last CG solution (CG's warm start, decayed).
        iterations: CG iterations used by the last step.
        reduction_ratio: ``ρ`` of the last step (1 when not adapted).
    """

    count: torch.Tensor
    damping: torch.Tensor
    previous: Params
    iterations: torch.Tensor
    reduction_ratio: torch.Tensor


def hessian_free(model: Model, *, damping: float = 1.0, iterations: int = 20, tol: float = 5e-4,
                 warm_start: float = 0.95, adapt_damping: bool = True, learning_rate: ScalarOrSchedule = 1.0,
                 min_damping: float = 0.1, max_damping: float = 1e6,
                 diagonal_preconditioner: bool = False) -> GradientTransformation:
    """Hessian-free Newton direction: ``d ≈ (G + λ I)⁻¹ g`` by CG on GGN-vector products.

    Each step runs at most ``iterations`` CG steps (masked after convergence at
    relative residual ``tol``) on ``v ↦ G v + λ v``, with ``G`` the batch's GGN
    (``fprecond.ggn_vp``: one forward-mode and one reverse-mode pass per product),
    started from ``warm_start`` times the previous solution (Martens 2010, §4.5).
    With ``adapt_damping``, the Levenberg-Marquardt rule (Martens 2010, §4.1)
    compares the loss change of the step ``δ = -η d`` with the quadratic model's
    prediction, ``ρ = (L(θ + δ) - L(θ)) / (gᵀδ + ½ δᵀ G δ)``, and sets
    ``λ ← 3/2 λ`` when ``ρ < 1/4``, ``λ ← 2/3 λ`` when ``ρ > 3/4`` for the next step
    (one extra GGN product and two forward passes), keeping ``λ`` within
    ``[min_damping, max_damping]``: the floor guards against over-fitting the
    quadratic model of one mini-batch, which Martens' large batches did not need.
    With ``diagonal_preconditioner``, CG is preconditioned by
    ``(diag(F̂) + λ)^{3/4}`` with ``F̂`` the empirical Fisher's diagonal (Martens
    2010, §4.7; one extra backward pass). Returns ``d``; the chain applies ``-η``.
    ``update`` needs ``batch``. The transform has no guard of its own (a NaN gradient
    gives a NaN direction, which would also become the next warm start): use it inside
    :func:`~fprecond.transforms.apply_if_finite`, as :func:`newton_cg` does, which skips
    such a step and keeps the state. CG itself is scale-invariant, so gradients of
    ``1e-30`` or ``1e30`` (float32) give finite directions.
    """
    owner = "hessian_free"
    check_number(owner, "damping", damping, low=0.0, low_inclusive=False)
    check_number(owner, "warm_start", warm_start, low=0.0, high=1.0)
    check_number(owner, "tol", tol, low=0.0)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{owner}: iterations must be a positive int, got {iterations!r}")

    def init(params: Params) -> HessianFreeState:
        count = step_counter(owner, params)
        like = next(iter(params.values()))
        return HessianFreeState(count, torch.full((), float(damping), dtype=like.dtype, device=like.device),
                                tree_zeros_like(params), torch.zeros_like(count), torch.ones((), dtype=like.dtype,
                                                                                              device=like.device))

    def update(updates: Updates, state: HessianFreeState, params: Params | None = None, **extra: Any):
        params = require_params(owner, params)
        batch = extra.get("batch")
        if batch is None:
            raise TypeError(f"{owner}.update() needs the keyword argument 'batch': update(grads, state, params, "
                            "batch=...)")
        lam = state.damping

        def ggn(vector: Params) -> Params:
            return func.ggn_vp(model, params, batch, vector)

        def damped(vector: Params) -> Params:
            return tree_add_scaled(ggn(vector), vector, lam)

        start = tree_scale(state.previous, warm_start)
        preconditioner = None
        if diagonal_preconditioner:
            diagonal = estimate(model, params, batch, kind="empirical_fisher", structure="diag", fallback="diag")
            scaling = {name: (value + lam) ** -0.75 for block in diagonal.blocks
                       for name, value in block.diagonal.items()}  # type: ignore[attr-defined]

            def preconditioner(residual: Params) -> Params:
                return {name: scaling[name] * value for name, value in residual.items()}

        direction, info = conjugate_gradient(damped, updates, x0=start, iterations=iterations, tol=tol,
                                             preconditioner=preconditioner)
        new_damping, ratio = lam, torch.ones_like(lam)
        if adapt_damping:
            rate = evaluate(learning_rate, state.count).to(lam.dtype)
            step = tree_scale(direction, -rate)
            predicted = tree_vdot(updates, step) + 0.5 * tree_vdot(step, ggn(step))
            before = model.batch_loss(params, batch)
            after = model.batch_loss(tree_map(lambda p, s: p + s, params, step), batch)
            safe = torch.where(predicted < 0, predicted, -torch.finfo(lam.dtype).tiny)
            ratio = torch.where(torch.isfinite(after), (after - before) / safe, torch.zeros_like(lam))
            new_damping = torch.where(ratio < 0.25, lam * 1.5, torch.where(ratio > 0.75, lam * (2.0 / 3.0), lam))
            new_damping = new_damping.clamp(min_damping, max_damping)
        new_state = HessianFreeState(state.count + 1, new_damping, direction, info.iterations.to(state.count.dtype),
                                     ratio.to(lam.dtype))
        return direction, new_state

    return validated("hessian_free", GradientTransformation(init, update))


def newton_cg(model: Model, learning_rate: ScalarOrSchedule = 1.0, *, damping: float = 1.0, iterations: int = 20,
              tol: float = 5e-4, warm_start: float = 0.95, adapt_damping: bool = True,
              min_damping: float = 0.1, diagonal_preconditioner: bool = False) -> GradientTransformation:
    """Newton-CG / Hessian-free optimisation (Martens 2010): ``θ ← θ - η d`` with
    ``d ≈ (G + λ I)⁻¹ g`` from truncated CG on GGN-vector products and
    Levenberg-Marquardt adaptation of ``λ`` (see :func:`hessian_free`). The GGN is
    used rather than the Hessian because it is positive semi-definite, so CG is
    well defined. Non-finite steps are skipped."""
    check_number("newton_cg", "learning_rate", learning_rate, low=0.0, low_inclusive=False, allow_schedule=True)
    return guarded("newton_cg", named_chain(
        ("precondition", hessian_free(model, damping=damping, iterations=iterations, tol=tol, warm_start=warm_start,
                                      adapt_damping=adapt_damping, learning_rate=learning_rate,
                                      min_damping=min_damping, diagonal_preconditioner=diagonal_preconditioner)),
        ("learning_rate", scale_by_learning_rate(learning_rate)),
    ))
