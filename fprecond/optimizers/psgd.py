"""PSGD: preconditioned SGD with a preconditioner fitted on a matrix Lie group (Li 2018, 2019).

``scale_by_psgd`` turns the gradient ``g`` into ``P g`` with ``P = QᵀQ`` and ``Q``
upper triangular, fitted online to pairs ``(v, h)`` by the Lie-group steps of
:mod:`fprecond.optimizers._psgd_factors` (criterion ``E[hᵀ P h + vᵀ P⁻¹ v]``):

- ``variant="dense"``: one ``Q`` over all parameters, flattened in
  ``named_parameters`` order (``n × n`` for ``n`` parameters: small models only);
- ``variant="kron"``: per tensor ``P = (Q_rᵀQ_r) ⊗ (Q_lᵀQ_l)``, preconditioned
  gradient ``Q_lᵀ Q_l G Q_rᵀ Q_r`` on the tensor's matrix form (a Linear weight
  ``(out, in)``; a convolution kernel ``(O, C·kh·kw)`` as in ASDL; a vector ``(n, 1)``);
  vectors, scalars and sides longer than ``max_size`` get a diagonal factor. The
  two factors are rebalanced (``ρ``) before each fit, as the reference does.

Pairs (``curvature``):

- ``"hvp"`` (Li's Newton type, ASDL's default): ``v ~ N(0, I)`` drawn from the
  ``key`` extra and ``h = H v`` with ``H`` the Hessian of the batch loss
  (:func:`fprecond.func.hvp`), so ``P → |H|⁻¹``;
- ``"whitening"`` (Li's gradient-whitening / Fisher type): ``h = g`` and
  ``v ~ N(0, I)``, so ``P → E[g gᵀ]^(-1/2)``.

Schedule: the preconditioner is fitted on steps ``t`` with ``t % update_interval == 0``
and, when ``update_probability < 1``, only if a Bernoulli draw from the key says
so (``preconditioner_update_probability`` of Li's classes). The decision is a 0-dim
mask and the fit goes through :func:`fprecond.lazy.lazy_where`, so off-steps skip
the Hessian-vector product and ``vmap`` over an ensemble equals a loop.

Defaults and their sources:

- ``precond_lr=0.01``: ``step=0.01`` of ``update_precond_dense``/``update_precond_kron``
  (psgd_torch), ASDL's ``precond_lr=0.01``, and Li's ``lr_preconditioner`` for the
  ``max|∇|`` step normaliser used here;
- ``init_scale=None``: as Li's classes with ``preconditioner_init_scale=None``, the
  first fit sets ``Q = (vᵀv / hᵀh)^(1/4) I`` from its own pair (per tensor for
  ``kron``, as his ``Affine`` class; ``vᵀv`` is replaced by the number of entries
  for whitening, as there); ASDL instead starts at ``init_scale=1``;
- ``update_interval=1``, ``update_probability=1.0``: Li's classes and ASDL
  (``precond_update_interval`` defaults to 1);
- ``max_size=None`` (no limit): Li's ``preconditioner_max_size=inf``;
- recipe: ``learning_rate=0.01`` (Li's ``lr_params``), ``momentum=0``,
  ``clip=None`` (``grad_clip_max_norm=None``), ``weight_decay=0``.

Differences from the reference, by design: momentum (heavy ball on the
preconditioned direction, the shared recipe tail) replaces Li's moving average of
the gradient before preconditioning; clipping (``clip``) rescales ``P g`` to global
norm ``clip`` before momentum, where Li rescales the learning rate; weight decay is
an L2 term in the gradient that the Hessian-vector product does not see. The
balancing runs at every fit, as the functional ``update_precond_kron``, not with
probability 0.01 as the later classes. A Kronecker side of size 1 (a vector's
scalar side) is not fitted: it is a scale the other factor carries (see
:func:`~fprecond.optimizers._psgd_factors.kron_factor_update`). ``B = Q_l⁻ᵀ dX Q_r⁻¹``
follows Li's code; ASDL's port drops the transposes of its triangular solves.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch

from fprecond import func
from fprecond import random as random_keys
from fprecond._validation import check_choice, check_number, check_positive_int, step_counter
from fprecond.base import (
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Updates,
    named_chain,
    require_extras,
    require_params,
)
from fprecond.lazy import lazy_where
from fprecond.modeling import Model
from fprecond.optimizers._psgd_factors import (
    KronFactors,
    dense_factor_update,
    dense_precondition,
    init_kron_factors,
    kron_factor_update,
    kron_precondition,
    matrix_shape,
    pair_scale,
)
from fprecond.optimizers._recipe import recipe
from fprecond.precondition import is_due
from fprecond.transforms import clip_by_global_norm
from fprecond.transforms.grafting import safe_norm
from fprecond.tree import PyTree, ravel, tree_flatten_ordered, tree_leaves, tree_map, tree_unflatten_ordered

__all__ = ["scale_by_psgd", "psgd", "psgd_pair", "ScaleByPSGDState"]

VARIANTS = ("kron", "dense")
CURVATURES = ("hvp", "whitening")


class ScaleByPSGDState(NamedTuple):
    """State of :func:`scale_by_psgd`.

    Attributes:
        count: steps taken (0-dim int64).
        fits: preconditioner fits so far (0-dim int64); 0 means ``Q`` is still the
            initial one (with ``init_scale=None``, a placeholder identity).
        factors: ``variant="dense"``: ``Q`` of shape ``(n, n)``; ``variant="kron"``: a
            tree shaped like the parameters with a :class:`KronFactors` per tensor.
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count
    fits: torch.Tensor
    factors: PyTree


def psgd_pair(updates: Updates, key: torch.Tensor, *, curvature: str = "hvp", model: Model | None = None,
              params: Params | None = None, batch: Any = None) -> tuple[Updates, Updates]:
    """The pair ``(v, h)`` PSGD fits its preconditioner to, as trees shaped like ``updates``.

    ``v ~ N(0, I)`` with leaf ``i`` drawn from ``fold_in(key, i)`` in the leaf's dtype;
    ``h = H v`` (Hessian of ``model``'s batch loss at ``params``) for ``"hvp"``, and
    ``h = updates`` (the gradient) for ``"whitening"``.
    """
    check_choice("psgd_pair", "curvature", curvature, CURVATURES)
    leaves, spec = tree_flatten_ordered(updates)  # leaf i = parameter i
    draws = [random_keys.normal(random_keys.fold_in(key, index), tuple(leaf.shape), dtype=leaf.dtype)
             for index, leaf in enumerate(leaves)]
    v = tree_unflatten_ordered(spec, draws)
    if curvature == "whitening":
        return v, updates
    if model is None:
        raise TypeError("psgd_pair: curvature='hvp' needs the model")
    # The Hessian is the model's: ``updates`` (hence ``v``) is shaped like its params dict.
    return v, func.hvp(model, require_params("psgd_pair", params), batch, cast(dict, v))


def _first_scale(v: torch.Tensor, h: torch.Tensor, whitening: bool) -> torch.Tensor:
    """Li's on-the-fly initial scale from the first pair (see :func:`pair_scale`)."""
    if whitening:  # Li uses the number of entries (E[vᵀv]) in place of vᵀv here
        v_norm = torch.full((), float(v.numel()), dtype=h.dtype, device=h.device).sqrt()
    else:
        v_norm = safe_norm(v)
    return pair_scale(v_norm, safe_norm(h))


def scale_by_psgd(model: Model | None = None, *, variant: str = "kron", curvature: str = "hvp",
                  precond_lr: float = 0.01, init_scale: float | None = None, update_interval: int = 1,
                  update_probability: float = 1.0, max_size: int | None = None) -> GradientTransformation:
    """Precondition with PSGD's fitted ``P = QᵀQ`` (Li 2018; Li 2019): ``u = P g``.

    Each step ``t`` (0-based): when due, draw a pair ``(v, h)`` (:func:`psgd_pair`
    with key ``fold_in(key, t)``), rescale ``Q`` from it if this is the first fit
    and ``init_scale`` is None, and take one Lie-group step of ``Q`` (dense or per
    tensor Kronecker, see :mod:`fprecond.optimizers._psgd_factors`); then return
    ``P g`` with the current ``Q`` (the fit comes first, as in Li's ``step``).

    Args:
        model: the model description; needed for ``curvature="hvp"``.
        variant: ``"kron"`` (per tensor two factors) or ``"dense"`` (one ``Q`` over all parameters).
        curvature: ``"hvp"`` (``h = H v``, Newton type) or ``"whitening"`` (``h = g``).
        precond_lr: the normalised step of the fit, in ``(0, 1)``.
        init_scale: ``Q = init_scale · I`` at the start; None sets it from the first pair.
        update_interval: fit on steps ``0, k, 2k, ...``.
        update_probability: on those steps, fit with this probability (a Bernoulli draw
            from the key); with ``init_scale=None`` the first step always fits.
        max_size: ``kron`` only: sides longer than this get a diagonal factor (None: no limit).

    Extras: ``key`` always (the random ``v``), and ``batch`` for ``"hvp"``; ``params``
    for ``"hvp"``. Shapes: ``updates`` is a tree of tensors; for ``"hvp"`` it must be
    shaped like ``model.params()``.
    """
    name = "scale_by_psgd"
    check_choice(name, "variant", variant, VARIANTS)
    check_choice(name, "curvature", curvature, CURVATURES)
    check_number(name, "precond_lr", precond_lr, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    if init_scale is not None:
        check_number(name, "init_scale", init_scale, low=0.0, low_inclusive=False)
    check_positive_int("scale_by_psgd", "update_interval", update_interval)
    check_number(name, "update_probability", update_probability, low=0.0, high=1.0, low_inclusive=False)
    if max_size is not None:
        check_positive_int("scale_by_psgd", "max_size", max_size)
    if curvature == "hvp" and not isinstance(model, Model):
        raise TypeError(f"{name}: curvature='hvp' needs model= (a fprecond.Model), got {type(model).__name__}")
    whitening = curvature == "whitening"
    start = 1.0 if init_scale is None else init_scale

    def init(params: Params) -> ScaleByPSGDState:
        leaves = tree_leaves(params)
        count = step_counter(name, params)
        for index, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                raise TypeError(f"{name}: parameter {index} must be a floating-point tensor, got "
                                f"{getattr(leaf, 'dtype', type(leaf).__name__)}")
        if variant == "dense":
            dtypes = {leaf.dtype for leaf in leaves}
            if len(dtypes) > 1:
                raise ValueError(f"{name}: variant='dense' needs one dtype for all parameters, "
                                 f"got {sorted(map(str, dtypes))}")
            size = sum(leaf.numel() for leaf in leaves)
            factors: PyTree = start * torch.eye(size, dtype=leaves[0].dtype, device=leaves[0].device)
        else:
            factors = tree_map(lambda p: init_kron_factors(p.shape, max_size, start, p.dtype, p.device), params)
        return ScaleByPSGDState(count=count, fits=torch.zeros_like(count), factors=factors)

    def fit_dense(q: torch.Tensor, v: Updates, h: Updates, first: torch.Tensor) -> torch.Tensor:
        v_flat, h_flat = ravel(v)[0], ravel(h)[0]
        if init_scale is None:
            q = torch.where(first, q * _first_scale(v_flat, h_flat, whitening), q)
        return dense_factor_update(q, v_flat, h_flat, precond_lr)

    def fit_kron(factors: KronFactors, v: torch.Tensor, h: torch.Tensor, first: torch.Tensor) -> KronFactors:
        if init_scale is None:
            root = torch.sqrt(_first_scale(v, h, whitening))  # Q = scale·I: sqrt(scale) per factor
            factors = KronFactors(*(torch.where(first, f * root, f) for f in factors))
        shape = matrix_shape(v.shape)
        return kron_factor_update(factors, v.reshape(shape), h.reshape(shape), precond_lr)

    def apply(factors: PyTree, updates: Updates) -> Updates:
        if variant == "dense":
            flat, unravel = ravel(updates)
            return unravel(dense_precondition(factors, flat))
        return tree_map(lambda g, f: kron_precondition(f, g.reshape(matrix_shape(g.shape))).reshape(g.shape),
                        updates, factors)

    extras = ("key", "batch") if curvature == "hvp" else ("key",)

    @require_extras(name, *extras)
    def update(updates: Updates, state: ScaleByPSGDState, params: Params | None = None, **extra: Any):
        if curvature == "hvp":
            params = require_params(name, params)
        step_key = random_keys.fold_in(extra["key"], state.count)
        draw_key, pair_key = random_keys.split(step_key)
        due = is_due(state.count, update_interval)
        if update_probability < 1.0:
            due = due & (random_keys.uniform(draw_key, (), dtype=torch.float64) < update_probability)
        first = state.fits == 0
        if init_scale is None:
            due = due | first

        def fit() -> PyTree:
            v, h = psgd_pair(updates, pair_key, curvature=curvature, model=model, params=params,
                             batch=extra.get("batch"))
            if variant == "dense":
                return fit_dense(state.factors, v, h, first)
            return tree_map(lambda vi, hi, f: fit_kron(f, vi, hi, first), v, h, state.factors)

        factors = lazy_where(due, fit, state.factors)
        new_state = ScaleByPSGDState(count=state.count + 1, fits=state.fits + due.to(state.fits.dtype),
                                     factors=factors)
        return apply(factors, updates), new_state

    return GradientTransformation(init, update)


def psgd(model: Model | None, learning_rate: ScalarOrSchedule = 0.01, *, variant: str = "kron",
         curvature: str = "hvp", precond_lr: float = 0.01, init_scale: float | None = None,
         update_interval: int = 1, update_probability: float = 1.0, max_size: int | None = None,
         momentum: float = 0.0, weight_decay: float = 0.0, clip: float | None = None) -> GradientTransformation:
    """PSGD (Li 2018): ``apply_if_finite(weight_decay, precondition = [psgd, clip], momentum, learning_rate)``.

    ``θ ← θ - lr · m`` with ``m`` the momentum of ``clip(P (g + wd θ))``, ``P = QᵀQ``
    fitted by :func:`scale_by_psgd`; ``clip`` rescales the preconditioned gradient to
    global norm at most ``clip`` (Li's ``grad_clip_max_norm``). Defaults are Li's
    (``lr_params=0.01``, ``lr_preconditioner=0.01`` for the ``max|∇|`` normaliser,
    no momentum, no clipping, update probability 1, on-the-fly initial scale).

    The PSGD state is ``state.inner_state["precondition"]["psgd"]``. Extras: ``key``
    (and ``batch`` for ``curvature="hvp"``) at every update.

    Example::

        opt = fp.psgd(md, 0.1, variant="kron", momentum=0.9)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params, batch=batch, key=fp.random.key(0))
    """
    if clip is not None:
        check_number("psgd", "clip", clip, low=0.0, low_inclusive=False)
    links: list[tuple[str, GradientTransformation]] = [
        ("psgd", scale_by_psgd(model, variant=variant, curvature=curvature, precond_lr=precond_lr,
                               init_scale=init_scale, update_interval=update_interval,
                               update_probability=update_probability, max_size=max_size)),
    ]
    if clip is not None:
        links.append(("clip", clip_by_global_norm(clip)))
    return recipe("psgd", named_chain(*links), learning_rate=learning_rate, momentum=momentum,
                  weight_decay=weight_decay)
