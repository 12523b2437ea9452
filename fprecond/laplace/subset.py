"""Which parameters a Laplace posterior covers, and the summed-loss curvature over them.

Last-layer Laplace (Kristiadi et al. 2020) and subnetwork inference (Daxberger
et al. 2021) treat a subset ``S`` of the parameters as Gaussian and keep every
other parameter at its MAP value: the posterior is ``N(θ*_S, P_S⁻¹)`` with
``P_S = s · C_SS + P₀,S``, where ``C_SS`` is the curvature of the summed loss
restricted to the subset (the ``S × S`` sub-block of the full matrix, not a
Schur complement: the fixed parameters are conditioned on, not marginalised).

A subset is

- ``"all"``: every parameter (the plain Laplace approximation);
- ``"last_layer"``: the parameters (weight and bias) of the model's last
  supported layer in ``named_modules`` order (``Model.layers[-1]``), the
  output layer of a feed-forward network (laplace-torch's default,
  ``subset_of_weights="last_layer"``);
- an explicit collection of parameter names.

Only the subset's blocks are estimated. Blocks follow the structure:
``full`` is one dense block over the subset; ``layer`` keeps a dense block per
layer, restricted to the subset's parameters of that layer; ``diag`` keeps the
subset's diagonal; ``kron`` and ``unit`` blocks couple a layer's weight and
bias (the bias is a homogeneous input coordinate of the Kronecker factors), so
a subset holding one of them without the other is rejected, naming the layer.
The curvature is accumulated over batches exactly as
:func:`fprecond.curvature.dataset_statistics` does (Kronecker input factors
averaged over examples, everything else summed).
"""

from __future__ import annotations

from typing import Any, Collection, Iterable

import torch

from fprecond._validation import check_choice
from fprecond.curvature.blocks import CurvatureBlock
from fprecond.curvature.dataset import DatasetCurvature, accumulate_batches, dataset_statistics, summed_loss_model
from fprecond.curvature.estimate import BlockBuilder, check_options
from fprecond.curvature.matrix import Curvature
from fprecond.curvature.plan import BlockPlan, plan_blocks
from fprecond.modeling import Model

__all__ = ["SUBSETS", "resolve_subset", "subset_plans", "subset_statistics"]

Params = dict[str, torch.Tensor]

#: The named subsets (an explicit collection of parameter names is accepted too).
SUBSETS: tuple[str, ...] = ("all", "last_layer")


def resolve_subset(model: Model, subset: str | Collection[str]) -> tuple[str, ...]:
    """The parameter names of ``subset`` in ``named_parameters`` order (see the module docstring).

    Raises ``ValueError`` for an unknown name, an empty or repeated collection, and
    ``"last_layer"`` on a model without supported layers; ``TypeError`` for a
    collection that is not of strings.
    """
    owner = "fit_laplace"
    if isinstance(subset, str):
        check_choice(owner, "subset", subset, SUBSETS)
        if subset == "all":
            return model.param_names
        if not model.layers:
            raise ValueError(f"{owner}: subset 'last_layer' needs a supported layer, but the model's parameters "
                             f"{list(model.unsupported)} all belong to other modules; pass the parameter names "
                             "instead")
        return _in_model_order(model, model.layers[-1].param_names)
    if not isinstance(subset, Iterable) or isinstance(subset, (bytes, torch.Tensor)):
        raise TypeError(f"{owner}: subset must be 'all', 'last_layer' or a collection of parameter names, "
                        f"got {type(subset).__name__}")
    names = list(subset)
    if not names:
        raise ValueError(f"{owner}: subset is empty; name at least one parameter")
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"{owner}: subset must hold parameter names (str), got {bad!r}")
    unknown = [name for name in names if name not in model.param_names]
    if unknown:
        raise ValueError(f"{owner}: subset names unknown parameters {unknown}; the model has {list(model.param_names)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{owner}: subset names {repeated} more than once")
    return _in_model_order(model, names)


def _in_model_order(model: Model, names: Iterable[str]) -> tuple[str, ...]:
    wanted = set(names)
    return tuple(name for name in model.param_names if name in wanted)


def subset_plans(model: Model, names: tuple[str, ...], *, kind: str, structure: str, approx: str = "expand",
                 fallback: str = "error") -> tuple[BlockPlan, ...]:
    """The blocks of ``structure`` over the parameters ``names`` only (see the module docstring).

    Raises ``ValueError`` where a ``kron``/``unit`` block would mix parameters inside and
    outside the subset, and (``fallback="error"``) for a subset parameter outside
    supported layers in ``kron``/``unit`` structure, as :func:`fprecond.curvature.estimate`.
    """
    owner = "fit_laplace"
    check_choice(owner, "fallback", fallback, ("error", "diag"))
    if names == model.param_names:
        return plan_blocks(model, kind, structure, approx, fallback)
    # Parameters outside the subset get no block, so their fallback never matters.
    full_plans = plan_blocks(model, kind, structure, approx, "diag")
    shapes = {plan_name: shape for plan in full_plans for plan_name, shape in zip(plan.names, plan.shapes)}
    if structure == "full":
        return (BlockPlan("dense", names, tuple(shapes[name] for name in names)),)
    wanted = set(names)
    plans: list[BlockPlan] = []
    for plan in full_plans:
        inside = tuple(name for name in plan.names if name in wanted)
        if not inside:
            continue
        if plan.layer is None and structure in ("kron", "unit") and fallback == "error":
            raise ValueError(f"{owner}: structure {structure!r} is undefined for subset parameter {inside[0]!r}: it "
                             "is not in a supported layer; pass fallback='diag' to give it a diagonal block")
        if inside == plan.names:
            plans.append(plan)
        elif structure in ("layer", "diag"):
            # The exact sub-block of a dense or diagonal layer block: built from per-example
            # gradients of these parameters alone.
            form = "dense" if structure == "layer" else "diag"
            plans.append(BlockPlan(form, inside, tuple(shapes[name] for name in inside)))
        else:
            layer = plan.layer.name if plan.layer is not None else inside[0]
            outside = [name for name in plan.names if name not in wanted]
            raise ValueError(f"{owner}: structure {structure!r} keeps one block for layer {layer!r} over "
                             f"{list(plan.names)}, but the subset holds {list(inside)} and not {outside}; add them to "
                             "the subset, or use structure 'full', 'layer' or 'diag'")
    return tuple(plans)


def subset_statistics(model: Model, params: Params, batches: Iterable[Any], names: tuple[str, ...], *, kind: str,
                      structure: str, approx: str = "expand", key: torch.Tensor | None = None, samples: int = 1,
                      fallback: str = "error", buffers: Params | None = None) -> DatasetCurvature:
    """One pass over ``batches``: the summed-loss curvature over ``names``, the summed loss and
    the example count (:func:`fprecond.curvature.dataset_statistics` restricted to a subset).

    The returned curvature's ``names``/``shapes`` are the subset's. With every parameter
    in the subset this is :func:`~fprecond.curvature.dataset_statistics` itself.
    """
    plans = subset_plans(model, names, kind=kind, structure=structure, approx=approx, fallback=fallback)
    if names == model.param_names:
        return dataset_statistics(model, params, batches, kind=kind, structure=structure, approx=approx, key=key,
                                  samples=samples, fallback=fallback, buffers=buffers)
    check_options(kind, key, samples, "example")
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[1], torch.Tensor):
        raise TypeError("fit_laplace: batches must be an iterable of (inputs, targets) pairs, got one pair; "
                        "wrap it in a list: [(inputs, targets)]")
    model.check_params(params)
    summed = summed_loss_model(model)
    shapes = tuple(tuple(params[name].shape) for name in names)

    def estimate_batch(batch: Any, batch_key: torch.Tensor | None) -> Curvature:
        builder = BlockBuilder(summed, params, batch, kind, approx, batch_key, samples, "example", buffers)
        blocks: tuple[CurvatureBlock, ...] = tuple(builder.block(plan) for plan in plans)
        return Curvature(blocks, kind, structure, names, shapes)

    return accumulate_batches(summed, params, batches, estimate_batch, key=key, buffers=buffers, owner="fit_laplace")
