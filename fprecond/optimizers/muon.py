"""Muon: momentum orthogonalised by Newton–Schulz, for the hidden weight matrices
(Keller Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural
networks", https://kellerjordan.github.io/posts/muon/; reference
``KellerJordan/Muon``, ``muon.py``).

For each weight matrix ``W`` (a convolution kernel ``(O, C, *k)`` is viewed as
``(O, C·Πk)``) with gradient ``G``:

    ``B ← μ B + (1-μ) G``;  ``M = (1-μ) G + μ B`` (Nesterov) or ``M = B``;
    ``O = NS₅(M)``  (quintic Newton–Schulz, :func:`fprecond.solvers.linalg.orthogonalize`);
    ``θ ← θ - lr · (s · O + wd · θ)``.

This is the reference's current *lerp* form (``momentum.lerp_(grad, 1-μ)``,
``grad.lerp_(momentum, μ)``). The classic form ``B ← μB + G``, ``M = G + μB``
(``torch.optim.Muon``'s documentation, Moonlight) gives ``M`` times ``1/(1-μ)``;
``NS₅`` normalises by ``||M||_F + 1e-7``, so both give the same ``O`` up to a
relative ``1e-7/||M||_F``. ``NS₅`` maps each singular value of ``M/||M||_F``
through ``x ↦ 3.4445x - 4.7750x³ + 2.0315x⁵`` five times: ``O ≈ U S' Vᵀ`` with
``S'`` roughly in ``[0.7, 1.2]`` rather than ``U Vᵀ`` exactly.

The shape scale ``s`` for an ``r × c`` matrix (the matrix orthogonalised, so
``c = C·Πk`` for a kernel):

* ``"jordan"``: ``sqrt(max(1, r/c))`` (the reference; it reads ``r, c`` from the
  last two dimensions of the gradient, which for a 4-D kernel are the spatial
  ones; here they are those of the matrix orthogonalised);
* ``"moonlight"``: ``0.2 · sqrt(max(r, c))`` (Liu et al. 2025, "Muon is Scalable for
  LLM Training"): matches the update RMS of AdamW (≈0.2), so AdamW's learning rate
  and weight decay can be reused;
* ``"none"``: ``1``.

Decoupled weight decay is multiplied by the unscaled ``lr`` (``p.mul_(1 - lr·wd)``
in the reference and in Moonlight).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch

from fprecond._validation import check_choice, check_number, check_positive_int
from fprecond.base import (
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Updates,
    identity,
    named_chain,
)
from fprecond.modeling import Model
from fprecond.optimizers._recipe import guarded
from fprecond.optimizers.first_order import adamw_chain
from fprecond.solvers.linalg import orthogonalize
from fprecond.transforms import add_decayed_weights, scale_by_learning_rate
from fprecond.transforms.partition import Labels, partition
from fprecond.tree import NAMESPACE, PyTree, tree_map, tree_zeros_like

__all__ = ["scale_by_muon", "muon", "muon_labels", "ScaleByMuonState", "SCALES"]

SCALES = ("jordan", "moonlight", "none")

# Layers whose weight is an input embedding or may be the output head: they go to AdamW.
_MATRIX_LAYERS = ("linear", "conv1d", "conv2d", "embedding")


class ScaleByMuonState(NamedTuple):
    """Muon's state: the momentum buffer ``B``, shaped like the parameters."""

    momentum: PyTree


def _shape_scale(scale: str, rows: int, columns: int) -> float:
    if scale == "jordan":
        return math.sqrt(max(1.0, rows / columns))
    if scale == "moonlight":
        return 0.2 * math.sqrt(max(rows, columns))
    return 1.0


def scale_by_muon(momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  scale: str = "jordan") -> GradientTransformation:
    """Muon's direction ``s · NS₅(M)`` for every leaf (all must have ``ndim >= 2``).

    See the module docstring for the math. Route vectors, embeddings and the output
    head elsewhere (:func:`muon` does, through :func:`fprecond.transforms.partition.partition`).

    Args:
        momentum: ``μ`` in ``[0, 1)``.
        nesterov: use ``M = (1-μ) G + μ B`` instead of ``M = B``.
        ns_steps: Newton–Schulz steps (the quintic coefficients are tuned for 5).
        scale: ``"jordan"``, ``"moonlight"`` or ``"none"`` (module docstring).

    Raises:
        ValueError: at ``init``, naming a parameter with fewer than two dimensions.
    """
    owner = "scale_by_muon"
    check_number(owner, "momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    check_positive_int(owner, "ns_steps", ns_steps)
    check_choice(owner, "scale", scale, SCALES)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{owner}: nesterov must be a bool, got {type(nesterov).__name__}")

    def init(params: Params) -> ScaleByMuonState:
        paths, leaves, _ = optree.tree_flatten_with_path(params, namespace=NAMESPACE)
        for path, leaf in zip(paths, leaves):
            if leaf.ndim < 2:
                name = ".".join(str(part) for part in path)
                raise ValueError(f"{owner}: parameter {name!r} has shape {tuple(leaf.shape)}; Muon orthogonalises "
                                 "matrices (ndim >= 2): route vectors to another transform (fprecond.optimizers."
                                 "muon.muon does, with partition)")
        return ScaleByMuonState(momentum=tree_zeros_like(params))

    def update(updates: Updates, state: ScaleByMuonState, params: Params | None = None, **extra: Any):
        del params, extra

        def buffer(b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return momentum * b + (1.0 - momentum) * g

        new_momentum = tree_map(buffer, state.momentum, updates)

        def direction(g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            blended = (1.0 - momentum) * g + momentum * b if nesterov else b
            matrix = blended.reshape(blended.shape[0], -1)
            rows, columns = matrix.shape
            # The Frobenius norm inside orthogonalize squares the entries: a float32 gradient
            # of 1e30 would overflow it and give a zero step. Entries above max^(1/4) are brought
            # to 1 first; that turns ||M|| + eps into ||M|| + s·eps (s = max|M| <= ||M||), a
            # relative change below eps, and leaves every ordinary gradient bit for bit as is.
            largest = matrix.abs().amax()
            huge = largest > torch.finfo(matrix.dtype).max ** 0.25
            matrix = matrix / torch.where(huge, largest, torch.ones_like(largest))
            orthogonal = orthogonalize(matrix, steps=ns_steps, coefficients="quintic")
            return (_shape_scale(scale, rows, columns) * orthogonal).reshape(blended.shape)

        return tree_map(direction, updates, new_momentum), ScaleByMuonState(momentum=new_momentum)

    return GradientTransformation(init, update)


def muon_labels(model: Model) -> dict[str, str]:
    """``{name: "muon" | "adamw"}`` for a model's parameters, following the reference's advice.

    ``"muon"``: every parameter of ``ndim >= 2`` except the weights of embedding
    layers, the weight of the output layer (the last Linear, Conv or Embedding
    layer in module order) and matrices outside supported layers whose name
    contains ``"embed"`` (e.g. a positional embedding ``nn.Parameter``).
    ``"adamw"``: those, and every parameter of ``ndim < 2`` (biases, norm gains).

    The reference README also keeps a ConvNet's *first* convolution on AdamW; pass
    your own ``labels`` to :func:`muon` for that.
    """
    shapes = {name: tuple(p.shape) for name, p in model.module.named_parameters()}
    matrix_layers = [layer for layer in model.layers if layer.kind in _MATRIX_LAYERS]
    excluded = {layer.weight for layer in matrix_layers if layer.kind == "embedding"}
    if matrix_layers:
        excluded.add(matrix_layers[-1].weight)
    in_layers = {name for layer in model.layers for name in layer.param_names}
    labels = {}
    for name in model.param_names:
        outside_embedding = name not in in_layers and "embed" in name.lower()
        hidden_matrix = len(shapes[name]) >= 2 and name not in excluded and not outside_embedding
        labels[name] = "muon" if hidden_matrix else "adamw"
    return labels


def _labels_by_ndim(params: Params) -> PyTree:
    return tree_map(lambda p: "muon" if p.ndim >= 2 else "adamw", params)


def muon(model: Model | None = None, learning_rate: ScalarOrSchedule = 0.02, momentum: float = 0.95,
         nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0, *,
         adamw_learning_rate: ScalarOrSchedule = 3e-4, adamw_betas: tuple[float, float] = (0.9, 0.95),
         adamw_eps: float = 1e-8, adamw_weight_decay: float = 0.0, scale: str = "jordan",
         labels: Labels | None = None) -> GradientTransformation:
    """Muon on the hidden matrices, AdamW on everything else (``MuonWithAuxAdam``).

    ``apply_if_finite(partition({"muon": named_chain(("muon", scale_by_muon(...)),
    ("weight_decay", ...), ("learning_rate", ...)), "adamw": adamw(...)}, labels))``: the
    state's ``inner_state`` is ``{"muon": ..., "adamw": ...}``, and a step whose gradient or
    update is not finite is skipped (zero update, state kept) and counted in ``state.skipped``.

    Routing: with ``labels`` (a tree of ``"muon"``/``"adamw"`` shaped like the
    parameters, or a function of them), as given; else with a ``model``,
    :func:`muon_labels` (embeddings and the output layer to AdamW); else every leaf
    with ``ndim >= 2`` to Muon.

    Defaults: Muon's ``lr = 0.02``, ``μ = 0.95``, Nesterov, 5 steps and the AdamW
    group's ``lr = 3e-4``, ``β = (0.9, 0.95)`` are the reference's
    (``SingleDeviceMuonWithAuxAdam``; its AdamW ``eps`` is 1e-10, here 1e-8 as
    ``torch.optim.AdamW``). Both weight decays are decoupled and default to 0.

    Example::

        from fprecond.optimizers.muon import muon

        opt = muon(md, 0.02, adamw_learning_rate=1e-3)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
    """
    if model is not None and not isinstance(model, Model):
        raise TypeError(f"muon: model must be an fprecond Model or None, got {type(model).__name__}")
    check_number("muon", "learning_rate", learning_rate, low=0.0, low_inclusive=False, allow_schedule=True)
    check_number("muon", "weight_decay", weight_decay, low=0.0)
    if not isinstance(adamw_betas, (tuple, list)) or len(adamw_betas) != 2:
        raise ValueError(f"muon: adamw_betas must be a pair (b1, b2), got {adamw_betas!r}")
    for name, value in (("adamw_betas[0]", adamw_betas[0]), ("adamw_betas[1]", adamw_betas[1])):
        check_number("muon", name, value, low=0.0, high=1.0, high_inclusive=False)
    check_number("muon", "adamw_eps", adamw_eps, low=0.0)
    check_number("muon", "adamw_weight_decay", adamw_weight_decay, low=0.0)
    check_number("muon", "adamw_learning_rate", adamw_learning_rate, low=0.0, low_inclusive=False,
                 allow_schedule=True)
    if labels is None:
        labels = muon_labels(model) if model is not None else _labels_by_ndim
    hidden = named_chain(
        ("muon", scale_by_muon(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, scale=scale)),
        ("weight_decay", add_decayed_weights(weight_decay) if weight_decay else identity()),
        ("learning_rate", scale_by_learning_rate(learning_rate)),
    )
    fallback = adamw_chain(adamw_learning_rate, b1=adamw_betas[0], b2=adamw_betas[1], eps=adamw_eps,
                           weight_decay=adamw_weight_decay)
    return guarded("muon", partition({"muon": hidden, "adamw": fallback}, labels))
