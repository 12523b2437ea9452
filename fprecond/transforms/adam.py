"""Adam's moment estimates and rescaling."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from fprecond._validation import check_number, step_counter
from fprecond.base import GradientTransformation, Params, Updates
from fprecond.tree import PyTree, tree_map, tree_zeros_like

__all__ = ["scale_by_adam", "ScaleByAdamState", "bias_correction", "root_mean_square"]


class ScaleByAdamState(NamedTuple):
    """Adam's state: the step count, the first moment ``mu``, the square root of the
    second moment ``nu_sqrt = sqrt(v)`` and (AMSGrad only) its running maximum
    ``nu_sqrt_max`` (an empty dict otherwise).

    The second moment is kept as its square root so that ``g²`` is never formed: in
    float32 a gradient entry above ``~1.8e19`` would make ``v`` infinite and the step
    zero; as a root, Adam stays invariant to the scale of the gradient up to
    ``float32``'s largest value.
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count
    mu: PyTree
    nu_sqrt: PyTree
    nu_sqrt_max: PyTree


def bias_correction(decay: float, count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``1 - decay ** count`` as a 0-dim tensor in the dtype of ``like``.

    Computed in float64 first so float64 training matches ``torch.optim`` exactly.
    """
    power = torch.pow(torch.full((), decay, dtype=torch.float64, device=count.device), count.to(torch.float64))
    return (1.0 - power).to(like.dtype)


def root_mean_square(root: torch.Tensor, gradient: torch.Tensor, decay: float) -> torch.Tensor:
    """``sqrt(decay · root² + (1 - decay) · gradient²)`` without squaring: the moving
    average of ``g²`` kept as its square root, as ``hypot(√decay · root, √(1-decay) · g)``,
    which neither overflows nor underflows where the result is representable."""
    return torch.hypot(math.sqrt(decay) * root, math.sqrt(1.0 - decay) * gradient)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                  amsgrad: bool = False) -> GradientTransformation:
    """Rescale by Adam's bias-corrected moments (Kingma & Ba 2015):

    ``m ← b1 m + (1-b1) g``, ``v ← b2 v + (1-b2) g²``,
    ``u = m̂ / (sqrt(v̂ + eps_root) + eps)`` with ``m̂ = m / (1-b1ᵗ)``, ``v̂ = v / (1-b2ᵗ)``.
    With ``amsgrad`` (Reddi et al. 2018) ``v̂`` uses the running maximum of ``v``,
    as ``torch.optim.Adam(amsgrad=True)`` does.

    ``v`` is kept as ``sqrt(v)`` (see :class:`ScaleByAdamState`): the same update up to
    rounding, and a ``±lr``-sized first step for a float32 gradient of ``1e30`` (where
    ``g²`` would overflow and ``torch.optim.Adam`` steps by zero).
    """
    check_number("scale_by_adam", "b1", b1, low=0.0, high=1.0, high_inclusive=False)
    check_number("scale_by_adam", "b2", b2, low=0.0, high=1.0, high_inclusive=False)
    check_number("scale_by_adam", "eps", eps, low=0.0)
    check_number("scale_by_adam", "eps_root", eps_root, low=0.0)

    def init(params: Params) -> ScaleByAdamState:
        zeros = tree_zeros_like(params)
        return ScaleByAdamState(
            count=step_counter("scale_by_adam", params),
            mu=zeros,
            nu_sqrt=tree_zeros_like(params),
            nu_sqrt_max=tree_zeros_like(params) if amsgrad else {},
        )

    def update(updates: Updates, state: ScaleByAdamState, params: Params | None = None, **extra: Any):
        del params, extra
        count = state.count + 1
        mu = tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu_sqrt = tree_map(lambda r, g: root_mean_square(r, g, b2), state.nu_sqrt, updates)
        nu_sqrt_max = tree_map(torch.maximum, state.nu_sqrt_max, nu_sqrt) if amsgrad else state.nu_sqrt_max
        second = nu_sqrt_max if amsgrad else nu_sqrt

        def direction(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            m_hat = m / bias_correction(b1, count, m)
            # sqrt(v̂) = sqrt(v) / sqrt(1 - b2ᵗ), the correction's root taken in float64.
            root_hat = r / bias_correction(b2, count, count.to(torch.float64)).sqrt().to(r.dtype)
            if eps_root:
                root_hat = torch.hypot(root_hat, torch.full_like(root_hat, math.sqrt(eps_root)))
            # The floor matters only for eps = 0, where a zero gradient would give 0/0.
            return m_hat / (root_hat + eps).clamp_min(torch.finfo(root_hat.dtype).tiny)

        new_state = ScaleByAdamState(count=count, mu=mu, nu_sqrt=nu_sqrt, nu_sqrt_max=nu_sqrt_max)
        return tree_map(direction, mu, second), new_state

    return GradientTransformation(init, update)
