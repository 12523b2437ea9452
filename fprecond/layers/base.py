"""The interface every layer type implements (one module per layer type).

A layer form turns what the taps record into the grouped-matrix view of
:mod:`fprecond.layers.layout`:

- ``features(module, x)`` runs inside the forward hook and keeps what the
  layer's math needs from its input ``x`` (the input itself, the padded input of a
  convolution, the normalised input of a norm layer);
- ``inputs(layer, features)`` gives ``ã`` with shape ``(N, P, G, S)``: ``N``
  examples, ``P`` weight-sharing positions (sequence positions, convolution
  locations; ``1`` without sharing), and the homogeneous coordinate appended
  when the layer has a bias;
- ``output_grads(layer, grads)`` reshapes gradients w.r.t. the layer's output,
  ``(K, N, *output)``, to ``(K, N, P, G, O)``.

With these, example ``n``'s gradient for backpropagated vector ``k`` is
``Σ_p g[k,n,p,g] ã[n,p,g]ᵀ`` for every layer type (see :mod:`fprecond.layers.math`).
"""

from __future__ import annotations

import abc

from typing import Any

import torch

from fprecond.layers import contractions
from fprecond.layers.contractions import KronApprox
from fprecond.layers.layout import MatrixLayout
from fprecond.modeling import Layer

__all__ = ["LayerForm", "append_homogeneous"]


class LayerForm(abc.ABC):
    """Per-layer-type math: see the module docstring."""

    #: True when the layer always shares its weights over positions (convolutions).
    always_shared: bool = False

    def validate(self, layer: Layer) -> None:
        """Raise ``ValueError`` naming the layer when its configuration is not supported."""

    @abc.abstractmethod
    def layout(self, layer: Layer) -> MatrixLayout:
        """The layer's ``(G, O, S)`` layout."""

    @abc.abstractmethod
    def features(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """What the forward hook keeps from the layer input ``x``."""

    @abc.abstractmethod
    def inputs(self, layer: Layer, features: torch.Tensor) -> torch.Tensor:
        """``ã`` of shape ``(N, P, G, S)``."""

    @abc.abstractmethod
    def output_grads(self, layer: Layer, grads: torch.Tensor) -> torch.Tensor:
        """``(K, N, *output)`` -> ``(K, N, P, G, O)``."""


    def kronecker_factors(self, layer: Layer, features: torch.Tensor, grads: torch.Tensor,
                          approx: KronApprox) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, G)`` of :func:`fprecond.layers.contractions.kronecker_factors`; a layer type may
        override this with a layout that avoids copies of its (large) inputs."""
        return contractions.kronecker_factors(self.inputs(layer, features), self.output_grads(layer, grads), approx)


def append_homogeneous(inputs: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """Append the homogeneous coordinate ``1`` on the last dimension when the layer has a bias."""
    if not has_bias:
        return inputs
    ones = torch.ones(*inputs.shape[:-1], 1, dtype=inputs.dtype, device=inputs.device)
    return torch.cat([inputs, ones], dim=-1)
