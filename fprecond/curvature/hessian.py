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

from fprecond.layers import form_of
from fprecond.modeling import Layer, Model, unpack_batch
from fprecond.taps import perturbed_forward
from fprecond.tree import ravel

__all__ = ["hessian_block", "output_hessians"]


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


def output_hessians(model: Model, params: dict[str, torch.Tensor], batch: Any, layer: Layer,
                    buffers: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ã, H)`` for ``layer``: inputs ``(N, P, G, S)`` and ``H`` ``(U, N, P, G, O)``.

    ``H[u, n, p, g, o]`` is ``Σ_{p'} ∂²L/∂z[n,p,(g,o)] ∂z[n,p',u]``: column ``u`` of example
    ``n``'s output Hessian, summed over the positions ``p'`` of the unit ``u``.
    """
    inputs, targets = unpack_batch(batch)
    fn, zeros = perturbed_forward(model, params, inputs, buffers)
    name = layer.name
    form = form_of(layer)

    def loss_of(perturbation: torch.Tensor) -> torch.Tensor:
        outputs, _ = fn({**zeros, name: perturbation})
        return model.loss(outputs, targets)

    gradient = grad(loss_of)
    zero = zeros[name]
    layout = form.layout(layer)
    units = layout.units
    channel_dim = 1 if layer.kind in ("conv1d", "conv2d") else zero.dim() - 1
    shape = [1] * zero.dim()
    shape[channel_dim] = units
    basis = torch.eye(units, dtype=zero.dtype, device=zero.device)

    def column(unit_vector: torch.Tensor) -> torch.Tensor:
        tangent = (unit_vector.reshape(shape) * torch.ones_like(zero))
        return jvp(gradient, (zero,), (tangent,))[1]

    columns = vmap(column)(basis)  # (U, *z.shape)
    _, features = fn(zeros)
    return form.inputs(layer, features[name]), form.output_grads(layer, columns)
