"""``nn.LayerNorm``: ``z = γ ⊙ x̂ + β`` over the normalised shape, elementwise.

Each normalised feature ``d`` is a group with one output and inputs
``(x̂_d, 1)`` (``"elementwise"`` layout); leading dimensions are positions.
"""

from __future__ import annotations

import math

from typing import Any

import torch
import torch.nn.functional as F

from fprecond.layers.base import LayerForm, append_homogeneous
from fprecond.layers.layout import MatrixLayout
from fprecond.modeling import Layer


def elementwise_layout(layer: Layer, shape: tuple[int, ...]) -> MatrixLayout:
    """The layout of a scale-and-shift layer with parameters of ``shape``."""
    columns = int(layer.weight is not None) + int(layer.bias is not None)
    return MatrixLayout("elementwise", layer.weight, layer.bias, shape, math.prod(shape), 1, columns)


def elementwise_inputs(layer: Layer, normalised: torch.Tensor) -> torch.Tensor:
    """``(N, P, D)`` normalised inputs -> ``(N, P, D, S)`` with ``S`` = (x̂ if weight) + (1 if bias)."""
    if layer.weight is None:  # a shift only: its input is the homogeneous coordinate alone
        return torch.ones_like(normalised).unsqueeze(-1)
    return append_homogeneous(normalised.unsqueeze(-1), layer.bias is not None)


class LayerNormForm(LayerForm):
    def layout(self, layer: Layer) -> MatrixLayout:
        module: Any = layer.module
        return elementwise_layout(layer, tuple(module.normalized_shape))

    def features(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def inputs(self, layer: Layer, features: torch.Tensor) -> torch.Tensor:
        module: Any = layer.module
        n, d = features.shape[0], math.prod(module.normalized_shape)
        return elementwise_inputs(layer, features.reshape(n, -1, d))

    def output_grads(self, layer: Layer, grads: torch.Tensor) -> torch.Tensor:
        module: Any = layer.module
        k, n, d = grads.shape[0], grads.shape[1], math.prod(module.normalized_shape)
        return grads.reshape(k, n, -1, d, 1)
