"""fprecond: gradient preconditioning for PyTorch, functional, on ``torch.func``.

The public API is re-exported here; see the README for a tour.
"""

from fprecond import curvature, layers, losses, random, schedules, tree
from fprecond.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    Schedule,
    ScalarOrSchedule,
    Updates,
    apply_updates,
    chain,
    identity,
    named_chain,
    require_extras,
    require_params,
)
from fprecond.func import (
    empirical_fisher_vp,
    fisher_vp,
    ggn_vp,
    hvp,
    jvp,
    loss_and_grads,
    per_example_grads,
    vjp,
)
from fprecond.curvature import Curvature, CurvatureEstimator
from fprecond.modeling import Layer, Model, model
from fprecond.optimizers import adam, adamw, sgd
from fprecond.transforms import (
    ApplyIfFiniteState,
    ScaleByAdamState,
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    apply_if_finite,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)
from fprecond.taps import Taps, layer_taps
from fprecond.tree import pytree_dataclass, static_field

__version__ = "0.1.0"

__all__ = [
    "ApplyIfFiniteState",
    "Curvature",
    "CurvatureEstimator",
    "EmptyState",
    "GradientTransformation",
    "Layer",
    "Model",
    "OptState",
    "Params",
    "ScalarOrSchedule",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "Schedule",
    "Taps",
    "TraceState",
    "Updates",
    "__version__",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_if_finite",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "curvature",
    "empirical_fisher_vp",
    "fisher_vp",
    "ggn_vp",
    "hvp",
    "identity",
    "jvp",
    "layer_taps",
    "layers",
    "loss_and_grads",
    "losses",
    "model",
    "named_chain",
    "per_example_grads",
    "pytree_dataclass",
    "random",
    "require_extras",
    "require_params",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "schedules",
    "sgd",
    "static_field",
    "trace",
    "tree",
    "vjp",
]
