"""Adam's moment estimates and rescaling."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fprecond._validation import check_number, step_counter
from fprecond.base import GradientTransformation, Params, Updates
from fprecond.tree import PyTree, tree_map, tree_zeros_like

__all__ = ["scale_by_adam", "ScaleByAdamState", "bias_correction"]


class ScaleByAdamState(NamedTuple):
    """Adam's state: the step count, first and second moments, and (AMSGrad only)
    the running maximum of the second moment (an empty dict otherwise)."""

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count
    mu: PyTree
    nu: PyTree
    nu_max: PyTree


def bias_correction(decay: float, count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``1 - decay ** count`` as a 0-dim tensor in the dtype of ``like``.

    Computed in float64 first so float64 training matches ``torch.optim`` exactly.
    """
    power = torch.pow(torch.full((), decay, dtype=torch.float64, device=count.device), count.to(torch.float64))
    return (1.0 - power).to(like.dtype)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                  amsgrad: bool = False) -> GradientTransformation:
    """Rescale by Adam's bias-corrected moments (Kingma & Ba 2015):

    ``m ← b1 m + (1-b1) g``, ``v ← b2 v + (1-b2) g²``,
    ``u = m̂ / (sqrt(v̂ + eps_root) + eps)`` with ``m̂ = m / (1-b1ᵗ)``, ``v̂ = v / (1-b2ᵗ)``.
    With ``amsgrad`` (Reddi et al. 2018) ``v̂`` uses the running maximum of ``v``,
    as ``torch.optim.Adam(amsgrad=True)`` does.
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
            nu=tree_zeros_like(params),
            nu_max=tree_zeros_like(params) if amsgrad else {},
        )

    def update(updates: Updates, state: ScaleByAdamState, params: Params | None = None, **extra: Any):
        del params, extra
        count = state.count + 1
        mu = tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = tree_map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
        nu_max = tree_map(torch.maximum, state.nu_max, nu) if amsgrad else state.nu_max
        second = nu_max if amsgrad else nu

        def direction(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            m_hat = m / bias_correction(b1, count, m)
            v_hat = v / bias_correction(b2, count, v)
            return m_hat / (torch.sqrt(v_hat + eps_root) + eps)

        return tree_map(direction, mu, second), ScaleByAdamState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return GradientTransformation(init, update)
