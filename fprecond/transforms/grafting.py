"""Layer-wise grafting: one method's step size with another method's direction.

Agarwal et al. (2020), "Disentangling adaptive gradient methods from learning
rates", graft the per-layer norm of a *magnitude* method onto the direction of a
*direction* method::

    u = d · ||m||_F / ||d||_F      per leaf (parameter tensor)

with ``m`` and ``d`` the two methods' updates for the same incoming gradient.
Distributed Shampoo (Anil et al., 2020; Shi et al., 2023) uses it to give
Shampoo the step sizes of a diagonal method it is known to work with.

This module offers :func:`graft` (the combinator) and
:func:`scale_by_grafting`, the diagonal methods Meta's ``distributed_shampoo``
grafts from (``SGDGraftingConfig``, ``AdaGradGraftingConfig``,
``RMSpropGraftingConfig``, ``AdamGraftingConfig``), applied, as there, to the
exponential moving average of the gradient (the "filtered gradient", see
:func:`filtered_gradient`) while their second moments see the raw gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fprecond._validation import check_choice, check_number
from fprecond.base import GradientTransformation, OptState, Params, Updates
from fprecond.lazy import lazy_where
from fprecond.transforms.adam import bias_correction, root_mean_square
from fprecond.tree import PyTree, tree_leaves, tree_map, tree_zeros_like

__all__ = [
    "GRAFT_TYPES",
    "GraftState",
    "ScaleByGraftingState",
    "filtered_gradient",
    "graft",
    "safe_norm",
    "scale_by_grafting",
]

GRAFT_TYPES = ("sgd", "adagrad", "adam", "rmsprop", "none")

# Meta's defaults per grafting config: (beta2, epsilon, bias-corrected second moment).
_GRAFT_DEFAULTS: dict[str, tuple[float, float, bool]] = {
    "sgd": (1.0, 0.0, False),
    "none": (1.0, 0.0, False),
    "adagrad": (1.0, 1e-10, False),  # AdaGradGraftingConfig: sum of squares, eps 1e-10
    "rmsprop": (0.99, 1e-8, False),  # RMSpropGraftingConfig
    "adam": (0.999, 1e-8, True),  # AdamGraftingConfig, bias-corrected second moment
}


def counter(tree: PyTree) -> torch.Tensor:
    """A 0-dim int64 zero on the device of ``tree``'s first leaf (CPU for an empty tree,
    which :func:`fprecond.transforms.partition.partition` hands to a label without leaves)."""
    leaves = tree_leaves(tree)
    return torch.zeros((), dtype=torch.int64, device=leaves[0].device if leaves else None)


def safe_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||_F`` as a 0-dim tensor without overflow or underflow of the squares.

    ``torch.linalg.vector_norm`` squares the entries, so float32 entries of 1e±30 give
    ``inf`` or 0. The plain norm is kept where it is safe: finite, and large enough
    that entries whose squares underflow change it by less than a rounding error
    (``>= sqrt(tiny · numel) / eps``). Elsewhere (rarely, checked through
    :func:`fprecond.lazy.lazy_where`) the entries are divided by the largest
    magnitude first, which keeps the sum in range.
    """
    info = torch.finfo(x.dtype)
    norm = torch.linalg.vector_norm(x)
    threshold = (info.tiny * max(x.numel(), 1)) ** 0.5 / info.eps

    def rescaled() -> torch.Tensor:
        scale = (x.abs().amax() if x.numel() else x.new_zeros(())).clamp_min(info.tiny)
        return scale * torch.linalg.vector_norm(x / scale)

    return lazy_where(~torch.isfinite(norm) | (norm < threshold), rescaled, norm)


def filtered_gradient(momentum: torch.Tensor, gradient: torch.Tensor, b1: float, step: torch.Tensor, *,
                      nesterov: bool = False, bias_correction_on: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's filtered gradient: ``m ← b1 m + (1-b1) g`` and the direction it gives.

    Returns ``(m, ĝ)`` with ``ĝ = m / (1 - b1^t)`` (``t = step``, 1-based), or with
    ``nesterov`` the look-ahead ``ĝ = (b1 m + (1-b1) g) / (1 - b1^(t+1))`` (Meta's
    ``beta3 = b1²``, i.e. NAdam). Without bias correction the denominators are 1.
    With ``b1 = 0`` this is ``(m, g)`` (``m`` unchanged: no buffer is kept).
    """
    if b1 == 0.0:
        return momentum, gradient
    # lerp(g, m, b1) = b1 m + (1-b1) g in one pass over the tensor.
    new_momentum = torch.lerp(gradient, momentum, b1)
    if nesterov:
        direction = torch.lerp(gradient, new_momentum, b1)
        power = step + 1
    else:
        direction, power = new_momentum, step
    if bias_correction_on:
        direction = direction / bias_correction(b1, power, direction)
    return new_momentum, direction


class ScaleByGraftingState(NamedTuple):
    """State of :func:`scale_by_grafting`: the step count, the filtered gradient ``mu``
    (an empty dict when ``b1 = 0``) and the square root ``nu_sqrt = sqrt(v)`` of the
    diagonal second moment (empty for SGD), kept as a root so that a huge float32
    gradient does not overflow ``g²`` (see :class:`fprecond.transforms.ScaleByAdamState`)."""

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count
    mu: PyTree
    nu_sqrt: PyTree


def scale_by_grafting(graft_type: str, *, b1: float = 0.0, b2: float | None = None, eps: float | None = None,
                      nesterov: bool = False, bias_correction_on: bool = True) -> GradientTransformation:
    """The diagonal method a Shampoo step is grafted from, as in Meta's ``distributed_shampoo``.

    With ``ĝ`` the filtered gradient (:func:`filtered_gradient`) and ``g`` the raw one:

    - ``"sgd"`` (and ``"none"``): ``u = ĝ``;
    - ``"adagrad"``: ``v ← v + g²``, ``u = ĝ / (sqrt(v) + eps)`` (eps default 1e-10);
    - ``"rmsprop"``: ``v ← b2 v + (1-b2) g²``, ``u = ĝ / (sqrt(v) + eps)`` (b2 0.99, eps 1e-8);
    - ``"adam"``: as ``"rmsprop"`` with ``v / (1 - b2^t)`` (b2 0.999, eps 1e-8).

    ``v`` is kept as ``sqrt(v)`` (state ``nu_sqrt``), updated by ``hypot`` without forming ``g²``.

    Defaults are those of Meta's ``*GraftingConfig`` classes; ``b2`` is ignored by
    ``"sgd"``, ``"none"`` and ``"adagrad"`` (a plain sum, as Meta's). ``b1`` (default 0)
    and ``nesterov`` make the filtered gradient; ``bias_correction_on`` switches
    its bias correction (the second moment's is fixed by the type).
    """
    owner = "scale_by_grafting"
    check_choice(owner, "graft_type", graft_type, GRAFT_TYPES)
    default_b2, default_eps, corrected = _GRAFT_DEFAULTS[graft_type]
    b2 = default_b2 if b2 is None or graft_type in ("sgd", "none", "adagrad") else b2
    eps = default_eps if eps is None else eps
    check_number(owner, "b1", b1, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "b2", b2, low=0.0, high=1.0, low_inclusive=False)
    check_number(owner, "eps", eps, low=0.0)
    if nesterov and b1 == 0.0:
        raise ValueError(f"{owner}: nesterov=True needs b1 > 0")
    diagonal = graft_type not in ("sgd", "none")

    def init(params: Params) -> ScaleByGraftingState:
        return ScaleByGraftingState(count=counter(params), mu=tree_zeros_like(params) if b1 else {},
                                    nu_sqrt=tree_zeros_like(params) if diagonal else {})

    def update(updates: Updates, state: ScaleByGraftingState, params: Params | None = None, **extra: Any):
        del params, extra
        count = state.count + 1
        if b1:
            pairs = tree_map(lambda m, g: filtered_gradient(m, g, b1, count, nesterov=nesterov,
                                                            bias_correction_on=bias_correction_on), state.mu, updates)
            mu = tree_map(lambda _, pair: pair[0], updates, pairs)
            direction = tree_map(lambda _, pair: pair[1], updates, pairs)
        else:
            mu, direction = state.mu, updates
        if not diagonal:
            return direction, ScaleByGraftingState(count=count, mu=mu, nu_sqrt=state.nu_sqrt)
        if b2 == 1.0:  # AdaGrad's sum: sqrt(r² + g²)
            nu_sqrt = tree_map(torch.hypot, state.nu_sqrt, updates)
        else:
            nu_sqrt = tree_map(lambda r, g: root_mean_square(r, g, b2), state.nu_sqrt, updates)

        def scaled(d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            if corrected:
                r = r / bias_correction(b2, count, count.to(torch.float64)).sqrt().to(r.dtype)
            # A floor on the denominator: with eps = 0 and a zero gradient, 0/0 must not appear.
            return d / (r + eps).clamp_min(torch.finfo(d.dtype).tiny)

        return tree_map(scaled, direction, nu_sqrt), ScaleByGraftingState(count=count, mu=mu, nu_sqrt=nu_sqrt)

    return GradientTransformation(init, update)


class GraftState(NamedTuple):
    """State of :func:`graft`: both methods' states and the step count (for ``warmup``)."""

    magnitude_state: OptState
    direction_state: OptState
    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count


def graft(magnitude: GradientTransformation, direction: GradientTransformation, *,
          warmup: int = 0) -> GradientTransformation:
    """Layer-wise grafting (Agarwal et al., 2020): ``u = d · ||m||_F / ||d||_F`` per leaf.

    Both transforms receive the same incoming updates, parameters and extras;
    ``m`` and ``d`` are their outputs. Where ``d`` is zero the result is zero; the
    ratio is formed as ``(d / max(||d||, tiny)) · ||m||`` with overflow-safe norms
    (:func:`safe_norm`), so tiny or huge norms neither overflow nor give NaN.

    Args:
        magnitude: the method whose per-leaf step norm is kept (e.g. Adam's).
        direction: the method whose direction is kept (e.g. Shampoo's).
        warmup: for the first ``warmup`` steps the output is ``m`` itself (both
            methods still update their states): Shi et al.'s
            ``start_preconditioning_step``, before which the grafted method runs alone.
    """
    for name, transform in (("magnitude", magnitude), ("direction", direction)):
        if not isinstance(transform, GradientTransformation):
            raise TypeError(f"graft: {name} must be a GradientTransformation, got {type(transform).__name__}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"graft: warmup must be an int >= 0, got {warmup!r}")

    def grafted(d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        unit = d / safe_norm(d).clamp_min(torch.finfo(d.dtype).tiny)
        return unit * safe_norm(m)

    def init(params: Params) -> GraftState:
        return GraftState(magnitude.init(params), direction.init(params), counter(params))

    def update(updates: Updates, state: GraftState, params: Params | None = None, **extra: Any):
        magnitudes, magnitude_state = magnitude.update(updates, state.magnitude_state, params, **extra)
        directions, direction_state = direction.update(updates, state.direction_state, params, **extra)
        out = tree_map(grafted, directions, magnitudes)
        if warmup:
            out = lazy_where(state.count < warmup, lambda: magnitudes, out)
        return out, GraftState(magnitude_state, direction_state, state.count + 1)

    return GradientTransformation(init, update)
