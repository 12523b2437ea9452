"""Building blocks of a transform chain: scaling, momentum, Adam, weight decay, clipping, NaN guard,
routing by label, grafting, and a wider working precision for narrow parameters."""

from fprecond.transforms.adam import ScaleByAdamState, scale_by_adam
from fprecond.transforms.clipping import clip_by_global_norm
from fprecond.transforms.finite import ApplyIfFiniteState, apply_if_finite
from fprecond.transforms.grafting import GraftState, graft, scale_by_grafting
from fprecond.transforms.momentum import TraceState, trace
from fprecond.transforms.partition import partition
from fprecond.transforms.precision import with_precision
from fprecond.transforms.scaling import ScaleByScheduleState, scale, scale_by_learning_rate
from fprecond.transforms.weight_decay import add_decayed_weights

__all__ = [
    "ApplyIfFiniteState",
    "GraftState",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "apply_if_finite",
    "clip_by_global_norm",
    "graft",
    "partition",
    "scale",
    "scale_by_adam",
    "scale_by_grafting",
    "scale_by_learning_rate",
    "trace",
    "with_precision",
]
