"""``nn.BatchNorm1d``/``nn.BatchNorm2d`` in evaluation mode: ``z = γ ⊙ x̂ + β`` per channel.

``x̂ = (x - running_mean) / sqrt(running_var + eps)``; spatial locations (and the
length of a ``(N, C, L)`` input) are positions. In training mode a batch-norm
output mixes the examples of the batch, so per-example curvature is undefined:
such a layer is rejected with a message saying to call ``module.eval()``.
"""

from __future__ import annotations

from typing import Any

import torch

from fprecond.layers.base import LayerForm
from fprecond.layers.layernorm import elementwise_inputs, elementwise_layout
from fprecond.layers.layout import MatrixLayout
from fprecond.modeling import Layer


class BatchNormForm(LayerForm):
    def validate(self, layer: Layer) -> None:
        module: Any = layer.module
        if module.training or module.running_mean is None:
            raise ValueError(
                f"batchnorm {layer.name!r} normalises with batch statistics (training mode or "
                "track_running_stats=False), which mixes examples, so per-example curvature is undefined; "
                "call module.eval() before estimating curvature"
            )

    def layout(self, layer: Layer) -> MatrixLayout:
        module: Any = layer.module
        return elementwise_layout(layer, (module.num_features,))

    def features(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.reshape(shape)
        var = module.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + module.eps)

    def inputs(self, layer: Layer, features: torch.Tensor) -> torch.Tensor:
        n, c = features.shape[0], features.shape[1]
        flat = features.reshape(n, c, -1).transpose(1, 2)  # (N, P, C)
        return elementwise_inputs(layer, flat)

    def output_grads(self, layer: Layer, grads: torch.Tensor) -> torch.Tensor:
        k, n, c = grads.shape[0], grads.shape[1], grads.shape[2]
        return grads.reshape(k, n, c, -1).transpose(2, 3).unsqueeze(-1)
