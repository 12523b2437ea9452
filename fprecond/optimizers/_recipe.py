"""The tail every curvature recipe shares: weight decay, momentum, learning rate,
and a guard that skips non-finite steps."""

from __future__ import annotations

from fprecond._validation import check_number
from fprecond.base import GradientTransformation, ScalarOrSchedule, named_chain, validated
from fprecond.transforms import add_decayed_weights, apply_if_finite, scale_by_learning_rate, trace

__all__ = ["recipe", "guarded"]


def recipe(name: str, preconditioner: GradientTransformation, *, learning_rate: ScalarOrSchedule, momentum: float,
           weight_decay: float) -> GradientTransformation:
    """``apply_if_finite(named_chain(weight_decay, <name>, momentum, learning_rate))``.

    Weight decay is added to the gradient before preconditioning (an L2 term, as
    K-FAC implementations do), momentum acts on the preconditioned direction, and
    a step whose gradient or update is not finite is skipped (zero update, state
    kept, counted in ``state.skipped``). Parameters and gradients are checked first
    (:func:`fprecond.base.validated`). The preconditioner's state is
    ``state.inner_state["precondition"]``.
    """
    check_number(name, "momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    check_number(name, "weight_decay", weight_decay, low=0.0)
    check_number(name, "learning_rate", learning_rate, low=0.0, low_inclusive=False, allow_schedule=True)
    links: list[tuple[str, GradientTransformation]] = []
    if weight_decay:
        links.append(("weight_decay", add_decayed_weights(weight_decay)))
    links.append(("precondition", preconditioner))
    if momentum:
        links.append(("momentum", trace(momentum)))
    links.append(("learning_rate", scale_by_learning_rate(learning_rate)))
    return guarded(name, named_chain(*links))


def guarded(name: str, transform: GradientTransformation) -> GradientTransformation:
    """The outer layers every recipe has: its inputs checked (:func:`fprecond.base.validated`,
    errors naming ``name``) and non-finite steps skipped and counted
    (:func:`fprecond.transforms.apply_if_finite`, ``state.skipped``)."""
    return validated(name, apply_if_finite(transform))
