"""First-order recipes: SGD, Adam and AdamW as chains of building blocks.

Each follows the update of its ``torch.optim`` namesake (tested to 1e-6 over 20
steps), with the learning rate a number or a schedule of the step count. As every
recipe, each is wrapped in :func:`~fprecond.transforms.apply_if_finite`: a step
whose gradient or update is not finite is skipped (zero update, state kept) and
counted in ``state.skipped``; the chain's state is ``state.inner_state``.
"""

from __future__ import annotations

from fprecond._validation import check_number
from fprecond.base import GradientTransformation, ScalarOrSchedule, chain, identity
from fprecond.optimizers._recipe import guarded
from fprecond.transforms import add_decayed_weights, scale_by_adam, scale_by_learning_rate, trace
from fprecond.transforms.weight_decay import Mask

__all__ = ["sgd", "adam", "adamw", "adamw_chain"]


def sgd(learning_rate: ScalarOrSchedule, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0) -> GradientTransformation:
    """Stochastic gradient descent, as ``torch.optim.SGD`` (``dampening=0``):

    ``g ← g + wd·θ``;  ``m ← μ m + g``;  ``θ ← θ - lr · (g + μ m if nesterov else m)``.
    """
    check_number("sgd", "momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    if nesterov and momentum == 0.0:
        raise ValueError("sgd: nesterov=True needs momentum > 0")
    return guarded("sgd", chain(
        add_decayed_weights(weight_decay) if weight_decay else identity(),
        trace(momentum, nesterov) if momentum else identity(),
        scale_by_learning_rate(learning_rate),
    ))


def adam(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False) -> GradientTransformation:
    """Adam (Kingma & Ba 2015), as ``torch.optim.Adam``: ``weight_decay`` is an L2
    term added to the gradient before the moments."""
    return guarded("adam", chain(
        add_decayed_weights(weight_decay) if weight_decay else identity(),
        scale_by_adam(b1=b1, b2=b2, eps=eps, amsgrad=amsgrad),
        scale_by_learning_rate(learning_rate),
    ))


def adamw(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2, amsgrad: bool = False, mask: Mask | None = None) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``: decoupled weight
    decay ``θ ← θ - lr · (adam_direction + wd · θ)``."""
    return guarded("adamw", adamw_chain(learning_rate, b1, b2, eps, weight_decay, amsgrad, mask))


def adamw_chain(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                weight_decay: float = 1e-2, amsgrad: bool = False, mask: Mask | None = None) -> GradientTransformation:
    """:func:`adamw` without the finite-step guard, for recipes that route some parameters to
    AdamW inside their own guarded chain (:func:`fprecond.optimizers.muon.muon`)."""
    return chain(
        scale_by_adam(b1=b1, b2=b2, eps=eps, amsgrad=amsgrad),
        add_decayed_weights(weight_decay, mask) if weight_decay else identity(),
        scale_by_learning_rate(learning_rate),
    )
