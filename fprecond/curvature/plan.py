"""Which block covers which parameters, decided once from the model, the curvature
kind and the structure, so that invalid combinations fail at construction.

Structures:

- ``full``: one dense block over all parameters.
- ``layer``: one dense block per supported layer (weight and bias together) and
  one per parameter outside supported layers.
- ``kron``: Kronecker factors for Linear, Conv and Embedding layers (expand or
  reduce for weight sharing); norm layers (LayerNorm, BatchNorm) use their exact
  unit-wise 2x2 blocks, since a scale-and-shift layer has no useful Kronecker
  form (the choice ASDL makes).
- ``unit``: unit-wise blocks for every supported layer.
- ``diag``: the diagonal, for every parameter.
- ``lowrank``: per layer (and per other parameter), the backpropagated vectors
  themselves, ``C_l = V_lᵀ V_l`` with one row per example and vector
  (:mod:`fprecond.curvature.lowrank`); for the kinds with few vectors per example
  (``empirical_fisher`` per example, ``fisher_mc``), so that a damped inverse is
  solved in the ``R x R`` Gram space when ``R`` is below the layer's size.

Parameters outside supported layers have no Kronecker or unit-wise form: with
``fallback="error"`` (default) ``kron``/``unit`` raise naming them; with
``fallback="diag"`` they get diagonal blocks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from fprecond._validation import check_choice
from fprecond.layers import MatrixLayout, form_of
from fprecond.modeling import SUPPORTED_LAYERS, Layer, Model

__all__ = ["BlockPlan", "plan_blocks", "KINDS", "STRUCTURES", "Kind", "Structure"]

Kind = Literal["hessian", "ggn", "fisher", "fisher_mc", "empirical_fisher"]
Structure = Literal["full", "layer", "kron", "unit", "diag", "lowrank"]
KINDS: tuple[str, ...] = ("hessian", "ggn", "fisher", "fisher_mc", "empirical_fisher")
STRUCTURES: tuple[str, ...] = ("full", "layer", "kron", "unit", "diag", "lowrank")
LOW_RANK_KINDS: tuple[str, ...] = ("empirical_fisher", "fisher_mc")
NORM_KINDS = ("layernorm", "batchnorm")


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """One planned block: ``form`` is ``"dense"``, ``"kron"``, ``"unit"``, ``"diag"`` or ``"lowrank"``;
    ``layer`` is the supported layer it comes from (None for other parameters)."""

    form: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    layer: Layer | None = None
    layout: MatrixLayout | None = None

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def plan_blocks(model: Model, kind: str, structure: str, approx: str = "expand",
                fallback: str = "error") -> tuple[BlockPlan, ...]:
    """The blocks of ``structure`` for ``model`` (raises ``ValueError`` for undefined combinations)."""
    owner = "curvature"
    check_choice(owner, "kind", kind, KINDS)
    check_choice(owner, "structure", structure, STRUCTURES)
    check_choice(owner, "approx", approx, ("expand", "reduce"))
    check_choice(owner, "fallback", fallback, ("error", "diag"))
    shapes = {name: tuple(p.shape) for name, p in model.module.named_parameters()}
    if structure == "lowrank" and kind not in LOW_RANK_KINDS:
        raise ValueError(f"{owner}: structure 'lowrank' stores a few vectors per example and is defined for kinds "
                         f"{', '.join(map(repr, LOW_RANK_KINDS))}, not {kind!r}")

    if structure == "full":
        return (BlockPlan("dense", model.param_names, tuple(shapes[n] for n in model.param_names)),)

    if structure in ("kron", "unit") and not model.layers:
        # Falling back to diagonal blocks for every parameter would silently turn K-FAC into
        # a diagonal method; a model without a single supported layer is almost surely a
        # custom module the user expects to be covered.
        raise ValueError(
            f"{owner}: structure {structure!r} needs at least one supported layer "
            f"({', '.join(sorted(t.__name__ for t in SUPPORTED_LAYERS))}), but the model's parameters "
            f"{list(model.unsupported)} all belong to other modules; use structure 'diag', 'layer' or 'full', or "
            "build the model from supported layers"
        )
    plans: list[BlockPlan] = []
    for layer in model.layers:
        form = form_of(layer)
        form.validate(layer)
        layout = form.layout(layer)
        names = layout.names
        block_shapes = tuple(shapes[n] for n in names)
        if structure == "layer":
            plans.append(BlockPlan("dense", names, block_shapes, layer, layout))
        elif structure == "lowrank":
            plans.append(BlockPlan("lowrank", names, block_shapes, layer, layout))
        elif structure == "diag":
            plans.append(BlockPlan("diag", names, block_shapes, layer, layout))
        elif structure == "unit" or layer.kind in NORM_KINDS:
            plans.append(BlockPlan("unit", names, block_shapes, layer, layout))
        else:
            plans.append(BlockPlan("kron", names, block_shapes, layer, layout))

    for name in model.unsupported:
        if structure in ("kron", "unit") and fallback == "error":
            raise ValueError(
                f"curvature: kind {kind!r} with structure {structure!r} is undefined for parameter {name!r}: it is "
                f"not in a supported layer ({', '.join(sorted(t.__name__ for t in SUPPORTED_LAYERS))}); pass fallback='diag' to "
                "give such parameters a diagonal block"
            )
        form_name = {"layer": "dense", "lowrank": "lowrank"}.get(structure, "diag")
        plans.append(BlockPlan(form_name, (name,), (shapes[name],)))
    return tuple(plans)

