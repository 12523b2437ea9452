"""``nn.Linear`` on inputs with any leading dimensions ``(N, *positions, D_in)``.

Positions (e.g. a sequence) share the weight: ``P = prod(positions)``, one group.
"""

from __future__ import annotations

from typing import Any

import torch

from fprecond.layers.base import LayerForm, append_homogeneous
from fprecond.layers.layout import MatrixLayout
from fprecond.modeling import Layer


class LinearForm(LayerForm):
    def layout(self, layer: Layer) -> MatrixLayout:
        module: Any = layer.module
        shape = tuple(module.weight.shape)
        has_bias = layer.bias is not None
        if layer.weight is None:
            raise ValueError(f"linear layer {layer.name!r}: a bias without a weight is not supported")
        return MatrixLayout("rows", layer.weight, layer.bias, shape, 1, module.out_features,
                            module.in_features + int(has_bias))

    def features(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        return x

    def inputs(self, layer: Layer, features: torch.Tensor) -> torch.Tensor:
        n, d = features.shape[0], features.shape[-1]
        flat = features.reshape(n, -1, 1, d)
        return append_homogeneous(flat, layer.bias is not None)

    def output_grads(self, layer: Layer, grads: torch.Tensor) -> torch.Tensor:
        k, n, d = grads.shape[0], grads.shape[1], grads.shape[-1]
        return grads.reshape(k, n, -1, 1, d)
