"""Exact Hessian pieces: blocks over chosen parameters and Hessians w.r.t. layer outputs.

- :func:`hessian_block`: ``∂²L/∂θ_B²`` for a set ``B`` of parameters, by
  forward-over-reverse differentiation (one Hessian-vector product per
  parameter in ``B``, vmapped). Exact for any layer; meant for small blocks.
- :func:`output_hessians`: for a layer with output ``z``, the Hessian of ``L``
  w.r.t. a perturbation of ``z`` that is shared by all examples and positions,
  applied to each output unit: one HVP per output unit, vmapped. Because
  examples do not interact, the result holds each example's own block
  ``∂²L/∂z_n²`` (summed over pairs of positions when the layer shares weights).
  It gives the Hessian's layer-wise structures without forming the layer block:
  for a Linear layer without sharing, ``∂²L/∂W² = Σ_n ∂²L/∂z_n² ⊗ ã_n ã_nᵀ``
  exactly, because ``z_n = W ã_n`` is linear in ``W``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import grad, jvp, vmap

from fprecond.layers import contractions, form_of
from fprecond.layers.contractions import KronApprox
from fprecond.modeling import Layer, Model, unpack_batch
from fprecond.taps import perturbed_forward
from fprecond.tree import ravel

__all__ = ["hessian_block", "output_hessians", "output_hessian_factors"]


def hessian_block(model: Model, params: dict[str, torch.Tensor], batch: Any, names: tuple[str, ...],
                  buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``(P_B, P_B)`` exact Hessian of the batch loss over ``names`` (flattened in that order)."""
    flat, unravel = ravel({name: params[name] for name in names})

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        return model.batch_loss({**params, **unravel(theta)}, batch, buffers)

    # Columns by vmapped forward-over-reverse products. (``jacfwd(jacrev(...))`` and
    # ``hessian`` give wrong cross terms between a LayerNorm weight and earlier layers
    # in torch 2.13; this formulation does not.)
    gradient = grad(loss_of)
    basis = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    return vmap(lambda tangent: jvp(gradient, (flat,), (tangent,))[1])(basis)


def _output_gradient(model: Model, params: dict[str, torch.Tensor], batch: Any, layer: Layer,
                     buffers: dict[str, torch.Tensor] | None):
    """``(gradient, zero, features)``: ``gradient(e)`` is ``∂L/∂e`` for a perturbation ``e`` of the
    layer's output, ``zero`` the zero perturbation, ``features`` the layer's tapped input."""
    inputs, targets = unpack_batch(batch)
    fn, zeros = perturbed_forward(model, params, inputs, buffers)
    name = layer.name

    def loss_of(perturbation: torch.Tensor) -> torch.Tensor:
        outputs, _ = fn({**zeros, name: perturbation})
        return model.loss(outputs, targets)

    _, features = fn(zeros)
    return grad(loss_of), zeros[name], features[name]


def _unit_columns(layer: Layer, gradient, zero: torch.Tensor) -> torch.Tensor:
    """``(U, *z.shape)``: the output Hessian applied to each output unit's indicator,
    shared by all examples and positions (one vmapped Hessian-vector product per unit)."""
    units = form_of(layer).layout(layer).units
    channel_dim = 1 if layer.kind in ("conv1d", "conv2d") else zero.dim() - 1
    shape = [1] * zero.dim()
    shape[channel_dim] = units
    basis = torch.eye(units, dtype=zero.dtype, device=zero.device)

    def column(unit_vector: torch.Tensor) -> torch.Tensor:
        tangent = unit_vector.reshape(shape) * torch.ones_like(zero)
        return jvp(gradient, (zero,), (tangent,))[1]

    return vmap(column)(basis)


def output_hessians(model: Model, params: dict[str, torch.Tensor], batch: Any, layer: Layer,
                    buffers: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ã, H)`` for ``layer``: inputs ``(N, P, G, S)`` and ``H`` ``(U, N, P, G, O)``.

    ``H[u, n, p, g, o]`` is ``Σ_{p'} ∂²L/∂z[n,p,(g,o)] ∂z[n,p',u]``: column ``u`` of example
    ``n``'s output Hessian, summed over the positions ``p'`` of the unit ``u`` (one
    Hessian-vector product per output unit, vmapped).
    """
    gradient, zero, features = _output_gradient(model, params, batch, layer, buffers)
    form = form_of(layer)
    return form.inputs(layer, features), form.output_grads(layer, _unit_columns(layer, gradient, zero))


def output_hessian_factors(model: Model, params: dict[str, torch.Tensor], batch: Any, layer: Layer,
                           approx: KronApprox, buffers: dict[str, torch.Tensor] | None = None,
                           chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Kronecker factors ``(A, G)`` of the Hessian for ``layer``.

    ``A`` is the inputs' factor as for the GGN. ``G`` sums the exact Hessian w.r.t. the
    layer output ``z`` over examples: ``"reduce"`` (and any layer without weight
    sharing) ``G = Σ_n Σ_{p,p'} ∂²L/∂z_np ∂z_np'``, from one Hessian-vector product per
    output unit; ``"expand"`` with weight sharing ``G = Σ_{n,p} ∂²L/∂z_np²``, which takes
    one product per (position, output unit), vmapped in chunks of ``chunk_size``.
    """
    form = form_of(layer)
    layout = form.layout(layer)
    gradient, zero, features = _output_gradient(model, params, batch, layer, buffers)
    inputs = form.inputs(layer, features)
    a = contractions.input_factor(inputs, approx)
    if approx == "reduce" or inputs.shape[1] == 1:
        columns = form.output_grads(layer, _unit_columns(layer, gradient, zero))  # (U, N, P, G, O)
        per_group = columns.reshape(layout.groups, layout.outputs, *columns.shape[1:])  # (G, O', N, P, G, O)
        return a, torch.einsum("grnpgo->gor", per_group)

    entries = zero[0].numel()  # positions x output units of one example

    def column(one_hot: torch.Tensor) -> torch.Tensor:
        tangent = one_hot.reshape(zero.shape[1:]).unsqueeze(0).expand_as(zero)
        return jvp(gradient, (zero,), (tangent,))[1]

    g = zero.new_zeros(layout.groups, layout.outputs, layout.outputs)
    for start in range(0, entries, chunk_size):
        indices = torch.arange(start, min(start + chunk_size, entries), device=zero.device)
        basis = torch.nn.functional.one_hot(indices, entries).to(zero.dtype)  # (c, P·U)
        # Which (position, group, unit) each basis vector perturbs, in the layer's own layout.
        hits = form.output_grads(layer, basis.reshape(-1, 1, *zero.shape[1:]))[:, 0]  # (c, P, G, O)
        block = form.output_grads(layer, vmap(column)(basis))  # (c, N, P, G, O)
        g = g + torch.einsum("inpgo,ipgr->gor", block, hits)
    return a, g
